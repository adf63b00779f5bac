"""The Image tab: upload, paste or webcam -> faces drawn, label, chart, streamed explanation.

API (gradio_client):

    from gradio_client import Client, handle_file
    prediction, *_ = Client("http://127.0.0.1:7860").predict(handle_file("face.jpg"),
                                                              api_name="/predict_image")
    prediction["label"], prediction["scores"], prediction["explanation"]

The first output is the prediction JSON of DESIGN.md §3; the rest feed the page.
"""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from core.errors import MediaError
from webapp.components.common import (MODEL_GROUP, Page, engine, handle_errors, require_file,
                                      stream_outputs)
from webapp.components.render import draw_faces, prediction_panels, result_values


def media_image(**kwargs) -> gr.Image:
    """A gr.Image whose handler gets the uploaded file's own path, undecoded.

    Stock gr.Image opens every upload with PIL and, in its default image_mode="RGB", decodes
    and converts it before the handler runs: a 16-bit PNG is clipped to 8 bits (and loses its
    face), a small PNG declaring 13000x13000 pixels costs its full decode before our limits
    run, a corrupt file ends as an anonymous "Error". The original file goes to core.media
    instead, which checks the header first and says what is wrong. Webcam, paste and examples
    arrive as uploaded files too; a data: URL (older clients) is written to a file by Gradio.
    (Wrapping the instance's method rather than subclassing: Gradio writes a .pyi stub next to
    the source of every Component subclass.)
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    stock = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        if payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return stock(payload)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return str(payload.path) if payload.path else None

    image.preprocess = preprocess
    return image


def ensure_examples(folder: Path) -> list[str]:
    """Example photos from scikit-image's bundled data, written once (nothing is downloaded)."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = skimage.data.astronaut()
    pictures = {
        "astronaut.png": astronaut,                             # a smiling face
        "astronaut_portrait.jpg": astronaut[20:300, 120:380],   # the same face, closer
        "cameraman.png": skimage.data.camera(),                 # a profile, hard for detectors
        "coffee_no_face.jpg": skimage.data.coffee(),            # no face at all
    }
    paths = []
    for name, pixels in pictures.items():
        path = folder / name
        if not path.exists():
            Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@handle_errors
def predict_image(image: str | None, aligned: bool = False):
    """Run the engine on one image, streaming the explanation as it is generated. `aligned`:
    the photo is a face crop (no detection; the whole image is the face)."""
    from core.media import VIDEO_EXTENSIONS

    path = require_file(image, "an image (upload, paste or webcam)")
    if Path(path).suffix.lower() in VIDEO_EXTENSIONS:  # the engine would read it as a clip
        raise MediaError(f"{Path(path).name}: this is a video: use the Video tab / predict_video")

    def render(result: dict, frames: list) -> tuple:
        # The engine's own decoded (EXIF-turned, scaled-down) frame: the boxes refer to it.
        return result, draw_faces(frames[0], result.get("faces") or []), *result_values(result)

    yield from stream_outputs(path, render, n_outputs=7, aligned=bool(aligned))


# Example answers, kept per (serving model version, example file): after a publish or rollback
# hot-swaps the model, an example runs again instead of showing the old version's answer (which
# Gradio's own example cache, one per launch, would). Only the serving version's answers are kept.
_example_answers: dict[tuple[str, str], tuple] = {}
_example_lock = threading.Lock()


@handle_errors
def predict_example(image: str):
    """An example click: the cached answer of the serving version, or a live (streamed) run."""
    key = (engine().info["model_version"], Path(image).name)
    with _example_lock:
        cached = _example_answers.get(key)
    if cached is not None:
        yield cached
        return
    final = None
    for final in predict_image(image):
        yield final
    if final is not None:
        version = final[0]["model_version"]
        with _example_lock:
            for stale in [k for k in _example_answers if k[0] != version]:  # swapped-out versions
                del _example_answers[stale]
            _example_answers[(version, Path(image).name)] = final


def create_image_tab(page: Page) -> dict:
    """Build the tab inside the current gr.Blocks (examples are written to `page.examples_dir`)."""
    examples_dir, concurrency = page.examples_dir, page.concurrency
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            image = media_image(sources=["upload", "clipboard", "webcam"],
                               label="Photo", height=380, elem_id="image-input")
            crop = gr.Checkbox(label="The photo is a face crop", value=False, elem_id="image-aligned",
                               info="As in FER2013 or RAF-DB aligned: no face detection, the "
                                    "whole photo is the face")
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                run = gr.Button("Recognise expression", variant="primary", elem_id="image-run")
            examples_holder = gr.Column()
        with gr.Column(scale=7):
            summary = gr.HTML(elem_id="image-summary")
            drawn = gr.Image(label="Faces and landmarks", type="pil", interactive=False,
                             height=380, elem_id="image-drawn")
            explanation = gr.Textbox(label="Explanation", lines=4, interactive=False,
                                     placeholder="The model's explanation appears here as it is "
                                                 "written.", elem_id="image-explanation")
    label, chart, faces, timings, prediction = prediction_panels(
        "image", "Faces: the prior network's view (AGR when an attribute network is configured)")

    outputs = [prediction, drawn, summary, label, chart, faces, timings, explanation]
    run.click(predict_image, inputs=[image, crop], outputs=outputs, api_name="predict_image",
              concurrency_id=MODEL_GROUP, concurrency_limit=concurrency)
    clear.add([image, *outputs])
    with examples_holder:
        examples = gr.Examples(examples=[[p] for p in ensure_examples(examples_dir)],
                               inputs=image, elem_id="image-examples",
                               label="Examples (scikit-image photos; the last "
                               "has no face)", api_visibility="private")
    # Clicking an example fills the input, then answers in the model's concurrency group.
    examples.load_input_event.then(predict_example, inputs=image, outputs=outputs,
                                   api_visibility="private", concurrency_id=MODEL_GROUP,
                                   concurrency_limit=concurrency)
    return {}
