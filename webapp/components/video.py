"""The Video tab: upload or record a clip -> sampled frames with their faces, label, explanation.

API (gradio_client):

    prediction, strip, *_ = Client(url).predict(handle_file("clip.mp4"),
                                                api_name="/predict_video")

Videos a browser cannot play (AVI, MKV, odd codecs) are converted with PyAV to an H.264 mp4
for the player; analysis always reads the original file.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import gradio as gr
import numpy as np

from core.media import content_hash
from core.errors import MediaError
from db.session import data_dir
from webapp.components.common import (MODEL_GROUP, Page, engine, handle_errors, require_file,
                                      stream_outputs)
from webapp.components.render import draw_faces, prediction_panels, result_values

log = logging.getLogger(__name__)

# What Chrome, Firefox and Safari all play without help.
PLAYABLE = {".mp4": {"h264", "av1"}, ".m4v": {"h264", "av1"}, ".webm": {"vp8", "vp9", "av1"}}
PLAYBACK_MAX_SIDE = 720
FOLDER_FPS = Fraction(25)  # core.media reads frame folders at 25 fps too


def _engine_settings() -> tuple[int, object]:
    """Frames per clip and media limits, as the engine will use them."""
    config = engine().config
    return config.num_frames, config.limits


def check_length(path: str, limits) -> dict:
    """Probe the clip (header first, nothing decoded) and refuse what the Video tab cannot use.

    An image gets pointed to the Image tab, and a long clip a message that says how to trim it.
    """
    from core.media import VideoTooLong, media_kind, probe_video

    if not Path(path).is_dir() and media_kind(path) == "image":
        from core.media import probe_image

        name = Path(path).name
        probe_image(path, limits)  # HEIC, empty or broken files: their own message first
        raise MediaError(f"{name}: this is an image: use the Image tab / predict_image")
    try:
        return probe_video(path, limits)
    except VideoTooLong as exc:
        minutes, seconds = divmod(round(exc.duration_s), 60)
        raise MediaError(f"This video is {minutes} min {seconds} s long; the app analyses clips "
                         f"of up to {exc.limit_s:.0f} s. Trim it first, e.g. "
                         f"ffmpeg -i in.mp4 -t {exc.limit_s:.0f} -c copy short.mp4") from None


def playable_video(path: str, in_cache: bool = False) -> str:
    """A file browsers can play: the clip itself, or an H.264 mp4 copy cached by content.

    `in_cache=True` always answers with a file under the data dir's cache (a plain copy when
    no conversion is needed), for clips that live in folders the app does not serve. A folder
    of frames (how DFEW and FERV39k ship clips) becomes an mp4 at 25 fps.
    """
    source = Path(path)
    codec = None if source.is_dir() else _codec(source)
    playable = codec in PLAYABLE.get(source.suffix.lower(), set())
    if playable and not in_cache:
        return str(source)
    # Named by content (the data store's hash), so each clip is converted once.
    target = data_dir() / "cache" / "playback" / (
        content_hash(source)[:20] + (source.suffix.lower() if playable else ".mp4"))
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part{target.suffix}")
        if playable:
            shutil.copyfile(source, partial)
        else:
            _write_h264(*_rgb_frames(source), partial)
            log.info("converted %s (%s) to H.264 for the player", source.name, codec or "frames")
        partial.replace(target)
    return str(target)


def _codec(path: Path) -> str:
    import av

    with av.open(str(path)) as container:
        return container.streams.video[0].codec_context.name


def _rgb_frames(source: Path) -> tuple[Iterator[np.ndarray], Fraction]:
    """Every frame of a video file or a frame folder, as RGB arrays, and the frame rate."""
    import av

    from core.media import IMAGE_EXTENSIONS, load_image

    if source.is_dir():  # the analysis's decoding (limits, 16-bit, EXIF) for the player too
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return (load_image(p) for p in files), FOLDER_FPS

    def decoded() -> Iterator[np.ndarray]:
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")

    with av.open(str(source)) as container:
        rate = container.streams.video[0].average_rate or FOLDER_FPS
    return decoded(), rate


def _write_h264(frames: Iterable[np.ndarray], rate: Fraction, target: Path) -> None:
    """RGB frames -> an H.264 mp4, at most PLAYBACK_MAX_SIDE px, even sides (yuv420p)."""
    import av

    with av.open(str(target), "w") as container:
        stream = None
        for rgb in frames:
            if stream is None:
                height, width = rgb.shape[:2]
                shrink = min(1.0, PLAYBACK_MAX_SIDE / max(width, height))
                size = (max(2, int(width * shrink) // 2 * 2), max(2, int(height * shrink) // 2 * 2))
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame.reformat(*size, format="yuv420p")):
                container.mux(packet)
        if stream is None:
            raise MediaError(f"{target.name}: no frames to convert")
        for packet in stream.encode():
            container.mux(packet)


def frame_times(media: dict, n_frames: int) -> list[float]:
    """When each sampled frame is, in seconds, from the result's media info alone: the engine
    samples `sample_indices(frame_count, n)` (core.media.load_video), so the same call gives
    the indices back without decoding anything."""
    from core.media import sample_indices

    if media.get("timestamps_s"):
        return list(media["timestamps_s"])
    fps = media.get("fps") or 0.0
    indices = sample_indices(int(media.get("frame_count") or 0), n_frames)
    if not fps or len(indices) != n_frames:
        return [0.0] * n_frames
    return [i / fps for i in indices]


def frame_strip(frames: list, timestamps: list[float], faces: list[dict]) -> list[tuple]:
    """(image with that frame's faces drawn, caption) for each sampled frame."""
    strip = []
    for index, (frame, t) in enumerate(zip(frames, timestamps)):
        mine = [f for f in faces if f.get("frame") == index]
        # Short enough for a gallery tile; the usual one face goes unsaid.
        extra = {0: " · no face", 1: ""}.get(len(mine), f" · {len(mine)} faces")
        caption = f"frame {index + 1} · {t:.1f} s{extra}"
        strip.append((draw_faces(frame, mine), caption))
    return strip


@handle_errors
def predict_video(video: str | None):
    """Run the engine on a clip: frames strip, faces per frame, label, streamed explanation."""
    path = require_file(video, "a video (upload or record one)")
    check_length(path, _engine_settings()[1])

    def render(result: dict, frames: list) -> tuple:
        # The engine's own sampled frames: the clip is decoded once, by the analysis.
        return (result, frame_strip(frames, frame_times(result.get("media") or {}, len(frames)),
                                    result.get("faces") or []), *result_values(result))

    yield from stream_outputs(path, render, n_outputs=7)


@handle_errors
def show_playable(video: str | None):
    """The player's copy of the upload; a message instead of a broken player."""
    if not video:
        return None, ""
    try:
        # The header check first: an over-long, over-size or non-video upload is never
        # decoded here, where nothing would use it (the analysis says what is wrong).
        check_length(video, _engine_settings()[1])
        return playable_video(video), ""
    except Exception as exc:  # the analysis reports unreadable files; the player just says so
        log.info("no playable copy of %s: %s", video, exc)
        return None, "The browser cannot play this file and it could not be converted."


def create_video_tab(page: Page) -> dict:
    concurrency = page.concurrency
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            video = gr.Video(sources=["upload", "webcam"], label="Video clip", height=320,
                             elem_id="video-input")
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                run = gr.Button("Recognise expression", variant="primary", elem_id="video-run")
            gr.Markdown("Clips up to 2 minutes. Frames are sampled uniformly; each is analysed "
                        "for faces. AVI/MKV and other formats the browser cannot play are "
                        "converted for the player below.")
            player = gr.Video(label="Playback", interactive=False, height=240)
            player_note = gr.Markdown()
        with gr.Column(scale=7):
            summary = gr.HTML(elem_id="video-summary")
            strip = gr.Gallery(label="Sampled frames and their faces", columns=4, height=300,
                               object_fit="contain", elem_id="video-strip")
            explanation = gr.Textbox(label="Explanation", lines=4, interactive=False)
    label, chart, faces, timings, prediction = prediction_panels("video", "Faces per frame")

    outputs = [prediction, strip, summary, label, chart, faces, timings, explanation]
    run.click(predict_video, inputs=video, outputs=outputs, api_name="predict_video",
              concurrency_id=MODEL_GROUP, concurrency_limit=concurrency)
    video.upload(show_playable, inputs=video, outputs=[player, player_note],
                 api_visibility="private")
    clear.add([video, player, player_note, *outputs])
    return {}
