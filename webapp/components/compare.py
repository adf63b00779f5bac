"""The Compare tab: Gemini's explanation beside the model's, and a blind A/B vote between them.

API (gradio_client):

    gemini, *_ = Client(url).predict(handle_file("face.jpg"), api_name="/gemini_explain")
    gemini["label"], gemini["explanation"], gemini["cached"], gemini["source"]

Without GEMINI_API_KEY (or GOOGLE_API_KEY) the Gemini side says how to configure it; the key
itself never leaves the server. Blind votes are stored as `Preference` rows; the pair being
voted on lives in server-side state, so a client cannot choose what its vote is about.
"""
from __future__ import annotations

import html
import os
import random

import gradio as gr

from core.errors import UserError
from webapp.auth import identify, require
from webapp.components.common import (MODEL_GROUP, Page, engine, explanation_text, handle_errors,
                                      require_file, server_choices)
from webapp.components.image import media_image

GEMINI_GROUP = "gemini"
GEMINI_CONCURRENCY = 4
NO_KEY_MESSAGE = ("Gemini is not configured on this server: set GEMINI_API_KEY (or "
                  "GOOGLE_API_KEY) in the environment or the Space's secrets and restart. The "
                  "model side works without it.")
WINNERS = {"A": "left", "B": "right", "tie": "tie"}


def gemini_configured() -> bool:
    return bool(os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"))


def _media(image: str | None, record: dict | None) -> str:
    """The dataset record's original file when one is loaded, else the upload."""
    if record and record.get("media_path"):
        return record["media_path"]
    return require_file(image, "an image (upload one or pick a dataset record)")


def _gemini(path: str, request: gr.Request | None = None, token: str | None = None) -> dict:
    """Gemini's answer within the caller's rate limit and the server's daily budget
    (webapp.limits); cached answers are free."""
    if not gemini_configured():
        raise UserError(NO_KEY_MESSAGE)
    from annotation.gemini import gemini_explain
    from webapp.limits import client_key, limited_gemini

    return limited_gemini(path, client_key(request, _signed_in(token)), gemini_explain)


def _signed_in(token: str | None) -> str | None:
    """The signed-in user's name (their own rate bucket), or None (keyed by address)."""
    if not token:
        return None
    try:
        who = identify(token)
    except UserError:  # an expired session still gets an answer, on the address's bucket
        return None
    return who.name if who else None


def _is_crop(record: dict | None) -> bool:
    """A dataset record imported as a face crop is analysed as one (no detection)."""
    return bool(record and record.get("media_path") and record.get("aligned"))


def _model(path: str, aligned: bool = False) -> dict:
    result = engine().predict(path, explain=True, aligned=aligned)
    return {"label": result.get("label"), "explanation": explanation_text(result),
            "has_explanation": bool((result.get("explanation") or "").strip()),
            "source": f"model:{result.get('model_version')}", "mode": result.get("mode"),
            "note": result.get("note")}


def _label_text(answer: dict) -> str:
    return answer.get("label") or "no label"


@handle_errors
def gemini_side(image: str | None, record: dict | None = None, token: str | None = None,
                request: gr.Request = None):
    """/gemini_explain: Gemini's label and explanation for an image (cached by content).

    Paid requests are rate-limited per visitor and capped per UTC day (webapp.limits)."""
    answer = _gemini(_media(image, record), request, token)
    where = "from the cache" if answer.get("cached") else "fresh"
    return (answer, _label_text(answer), answer.get("explanation") or "",
            f"{answer.get('source', 'gemini')} · {where}")


@handle_errors
def model_side(image: str | None, record: dict | None):
    answer = _model(_media(image, record), _is_crop(record))
    meta = answer["source"] + (f" · {answer['mode']}" if answer.get("mode") else "")
    return _label_text(answer), answer["explanation"], meta


NO_MODEL_EXPLANATION = ("Blind A/B compares two explanations, and the serving model gives "
                        "none ({why}): a vote would only say that some text beats no text, so "
                        "none is taken. Load an EMO-LLaMA checkpoint (EMO_LLAMA_MODEL) for A/B; "
                        "Compare side by side still shows Gemini's answer.")


def blind_available() -> tuple[bool, str]:
    """Whether the serving model explains (A/B needs two explanations), and why not."""
    info = engine().info
    if info.get("mode") == "prior-only":
        return False, NO_MODEL_EXPLANATION.format(why="prior-only mode")
    return True, ""


def blind_controls(token: str | None = None):
    """The Blind A/B button and its note, as the serving model allows (on load and sign-in)."""
    ok, why = blind_available()
    return gr.update(interactive=ok), gr.update(value=f"ℹ️ {why}" if why else "", visible=not ok)


@handle_errors
def blind_pair(image: str | None, record: dict | None, token: str | None = None,
               request: gr.Request = None):
    """Both answers in a random left/right order; which is which stays on the server.

    The model answers first: without an explanation from it there is nothing to compare, and
    Gemini is not paid for a pair that would be refused."""
    path = _media(image, record)
    model = _model(path, _is_crop(record))
    if not model.get("has_explanation"):
        raise UserError(NO_MODEL_EXPLANATION.format(
            why="prior-only mode" if model.get("mode") == "prior-only" else "no text"))
    answers = [_gemini(path, request, token), model]
    random.shuffle(answers)
    pair = {"path": path, "record": record, "left": answers[0], "right": answers[1]}
    return (pair, _label_text(answers[0]), answers[0].get("explanation") or "",
            _label_text(answers[1]), answers[1].get("explanation") or "",
            "Which explanation fits the face better? Vote to reveal the sources.",
            *[gr.update(interactive=True)] * 3)


@handle_errors
def vote(choice: str, pair: dict | None, token: str | None):
    """Store the viewer's preference (anonymous votes count; signed-in ones carry the user)."""
    if not pair:
        raise UserError("Start a blind comparison first; each pair takes one vote.")
    if not all(side.get("has_explanation", True) and (side.get("explanation") or "").strip()
               for side in (pair["left"], pair["right"])):
        raise UserError(NO_MODEL_EXPLANATION.format(why="no text") + " No vote was stored.")
    from core.media import content_hash
    from annotation.workflow import vote_preference

    who = identify(token) if token else None
    record = pair.get("record") or {}
    vote_preference(sample_id=record.get("sample_id"),
                    content_hash=record.get("content_hash") or content_hash(pair["path"]),
                    left_source=pair["left"]["source"], right_source=pair["right"]["source"],
                    winner=WINNERS[choice], user_id=who.user_id if who else None)
    reveal = (f"Thanks, vote stored. A was **{html.escape(pair['left']['source'])}**, B was "
              f"**{html.escape(pair['right']['source'])}**.")
    return None, reveal, *[gr.update(interactive=False)] * 3


@handle_errors
def pick_record(dataset: str | None, token: str | None):
    """A random image record of a dataset (signed-in users only: datasets may be private)."""
    require(token, "viewer")
    if not dataset:
        raise UserError("Choose a dataset first.")
    from annotation.workflow import random_sample
    from core.media import center_frame

    sample = random_sample(dataset)
    if sample is None:
        raise UserError(f"Dataset {dataset} has no records yet.")
    record = {"sample_id": sample["id"], "media_path": sample["media_path"],
              "content_hash": sample["content_hash"], "aligned": sample["aligned"]}
    truth = sample.get("label") or "unlabelled"
    return (center_frame(sample["media_path"]), record,
            f"Record #{sample['id']} of {html.escape(dataset)} · ground truth: {truth}")


def answer_column(title: str, text_id: str | None = None,
                  with_source: bool = True) -> list[gr.Textbox]:
    """One side of a comparison: a heading, the label, the explanation (and where it came from)."""
    with gr.Column():
        gr.Markdown(f"### {title}")
        boxes = [gr.Textbox(label="Label", interactive=False),
                 gr.Textbox(label="Explanation", lines=7, interactive=False, elem_id=text_id)]
        if with_source:
            boxes.append(gr.Textbox(label="Source", interactive=False, max_lines=1))
    return boxes


def create_compare_tab(page: Page) -> dict:
    token, concurrency = page.token, page.concurrency
    notice = gr.Markdown(visible=not gemini_configured(), value=f"⚠️ {NO_KEY_MESSAGE}",
                         elem_classes=["emo-notice"])
    record = gr.State(None)
    pair = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            image = media_image(sources=["upload", "clipboard", "webcam"], label="Photo",
                                height=320, elem_id="compare-input")
            with gr.Accordion("…or a dataset record", open=False):
                dataset = server_choices("Dataset", interactive=False,
                                         info="Sign in to compare on dataset records.")
                pick = gr.Button("Random record")
                record_info = gr.Markdown()
            ok, why = blind_available()  # refreshed on page load (a swap may change it)
            with gr.Row():
                side = gr.Button("Compare side by side", variant="primary",
                                 elem_id="compare-run")
                blind = gr.Button("Blind A/B test", elem_id="compare-blind", interactive=ok)
            blind_note = gr.Markdown(f"ℹ️ {why}" if why else "", visible=not ok,
                                     elem_id="compare-blind-note")
        with gr.Column(scale=8):
            with gr.Tabs() as views:
                with gr.Tab("Side by side", id="side"):
                    with gr.Row(equal_height=True):
                        g_label, g_text, g_meta = answer_column("Gemini", "compare-gemini-text")
                        m_label, m_text, m_meta = answer_column("EMO-LLaMA", "compare-model-text")
                    g_json = gr.JSON(visible=False)
                with gr.Tab("Blind A/B", id="blind"):
                    with gr.Row(equal_height=True):
                        a_label, a_text = answer_column("A", with_source=False)
                        b_label, b_text = answer_column("B", with_source=False)
                    with gr.Row():
                        vote_a = gr.Button("A is better", interactive=False,
                                           elem_id="compare-vote-a")
                        vote_tie = gr.Button("Tie", interactive=False)
                        vote_b = gr.Button("B is better", interactive=False)
                    verdict = gr.Markdown("Press **Blind A/B test** to get a pair; the "
                                          "sources stay hidden until you vote.",
                                          elem_id="compare-verdict")

    # A new upload replaces a picked record.
    image.upload(lambda: (None, ""), outputs=[record, record_info], api_visibility="private")
    side.click(gemini_side, inputs=[image, record, token],
               outputs=[g_json, g_label, g_text, g_meta],
               api_name="gemini_explain", concurrency_id=GEMINI_GROUP,
               concurrency_limit=GEMINI_CONCURRENCY)
    side.click(model_side, inputs=[image, record], outputs=[m_label, m_text, m_meta],
               api_visibility="private", concurrency_id=MODEL_GROUP,
               concurrency_limit=concurrency)
    vote_buttons = [vote_a, vote_tie, vote_b]
    for button, view in ((side, "side"), (blind, "blind")):
        button.click(lambda view=view: gr.Tabs(selected=view), outputs=views, queue=False,
                     api_visibility="private")
    blind.click(blind_pair, inputs=[image, record, token],
                outputs=[pair, a_label, a_text, b_label, b_text, verdict, *vote_buttons],
                api_visibility="private", concurrency_id=MODEL_GROUP,
                concurrency_limit=concurrency)
    for button, choice in zip(vote_buttons, ["A", "tie", "B"]):
        button.click(vote, inputs=[gr.State(choice), pair, token],
                     outputs=[pair, verdict, *vote_buttons], api_visibility="private")
    pick.click(pick_record, inputs=[dataset, token], outputs=[image, record, record_info],
               api_visibility="private")
    return {"notice": notice, "gates": [(dataset, "viewer", "datasets")],
            "on_access": (blind_controls, [blind, blind_note])}
