"""The Annotate tab: the annotator's queue, the correction editor, history, and the review queue.

Every handler takes the session token first and checks the role on the server (annotator+
to annotate, reviewer+ to review); `annotation.workflow` checks it again. Besides the page,
the workflow is open to scripts as JSON endpoints:

    c = Client(url); token = c.predict("ana", "s3cret-pass", api_name="/login")
    rec = c.predict(token, "rafdb", api_name="/next_record")          # or None: queue empty
    c.predict(token, rec["sample_id"], "happiness", "Cheeks raised…", "submitted", 0,
              api_name="/save_annotation")                            # 0: nothing saved yet

Saving over a newer version fails with that version's text shown; nothing typed is lost (the
workflow keeps the losing text in the record's history).
"""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from core.errors import UserError
from webapp.auth import require
from webapp.components.common import MODEL_GROUP, Page, engine, handle_errors, server_choices

HISTORY_COLUMNS = ["when (UTC)", "who", "action", "label", "explanation / comment"]
SUGGESTION_COLUMNS = ["source", "label", "explanation"]
DONE = {"draft": "Draft saved", "submitted": "Submitted", "discarded": "Discarded"}
# What the editor shows, in the order of the record handlers' outputs.
RECORD_FIELDS = ["sample_id", "version", "image", "video", "info", "suggestions", "label",
                 "explanation", "history", "progress", "message"]


# ------------------------------------------------------------------------- JSON endpoints

@handle_errors
def api_next_record(token: str, dataset: str) -> dict | None:
    """Claim your next record of a dataset: media path, ground truth, suggestions, your response."""
    from annotation import workflow

    who = require(token, "annotator")
    return workflow.next_record(who.user_id, dataset)


@handle_errors
def api_save_annotation(token: str, sample_id: int, label: str | None, explanation: str,
                        status: str, expected_version: int) -> dict:
    """Save a draft, submit or discard your correction; expected_version is the one you loaded."""
    from annotation import workflow

    who = require(token, "annotator")
    return workflow.save(who.user_id, sample_id, label, explanation, status, expected_version)


@handle_errors
def api_record_history(token: str, sample_id: int) -> list[dict]:
    """Every saved change of a record's corrections and reviews, oldest first."""
    from annotation import workflow

    require(token, "annotator")
    return workflow.history(sample_id)


@handle_errors
def api_review(token: str, response_id: int, decision: str, comment: str,
               expected_version: int | None = None) -> dict:
    """Accept or reject a submitted correction (reviewer+)."""
    from annotation import workflow

    who = require(token, "reviewer")
    return workflow.review(who.user_id, response_id, decision, comment, expected_version)


# ------------------------------------------------------------------------- rendering

def best_suggestion(suggestions: list[dict]) -> dict | None:
    """What the editor starts from: Gemini's valid answer if any, else the model's."""
    usable = [s for s in suggestions if s.get("status") == "ok" and s.get("explanation")]
    usable.sort(key=lambda s: not str(s.get("source", "")).startswith("gemini"))
    return usable[0] if usable else None


def suggestions_frame(suggestions: list[dict]) -> pd.DataFrame:
    rows = [[s.get("source", ""), s.get("label") or "",
             s.get("explanation") if s.get("status", "ok") == "ok"
             else f"(rejected: {s.get('reject_reason') or 'no reason given'})"]
            for s in suggestions]
    return pd.DataFrame(rows, columns=SUGGESTION_COLUMNS)


def history_frame(entries: list[dict]) -> pd.DataFrame:
    rows = []
    for e in reversed(entries):  # newest first
        after = e.get("after") or {}
        who = e.get("user", "")
        if e.get("author") and e["author"] != who:
            who = f"{who} (on {e['author']}'s)"
        rows.append([(e.get("at") or "")[:19].replace("T", " "), who, e.get("action", ""),
                     after.get("label") or "", after.get("explanation") or after.get("comment")
                     or ""])
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def progress_html(stats: dict) -> str:
    mine = int(stats.get("user_submitted") or 0)
    done, total = int(stats.get("complete") or 0), int(stats.get("total") or 0)
    share = done / total if total else 0.0
    return (f"<div class='emo-meta'>You: <b>{mine}</b> submitted · "
            f"{html.escape(str(stats.get('dataset', '')))}: <b>{done}</b>/{total} records "
            f"complete ({share:.0%})</div><progress class='emo-progress' max='{max(total, 1)}' "
            f"value='{done}'></progress>")


def display_media(path: str, modality: str):
    """(image, video) values for the record viewer: decoded pixels or a playable copy.

    Images go out as pixels and videos as a copy in the data dir's cache, so the app never
    has to serve files straight from a dataset folder.
    """
    if modality == "video":
        from webapp.components.video import playable_video

        return None, playable_video(path, in_cache=True)
    from core.media import load_image

    return load_image(path), None


def _viewer(path: str, modality: str) -> tuple:
    """Updates for the (image, video) viewer pair; a file that will not show is said so."""
    try:
        image, video = display_media(path, modality)
    except (UserError, OSError, ValueError) as exc:
        gr.Warning(html.escape(f"This record's media cannot be shown ({exc}); its text can "
                               "still be corrected.", quote=False))
        image = video = None
    return (gr.update(value=image, visible=modality != "video"),
            gr.update(value=video, visible=modality == "video"))


# ------------------------------------------------------------------------- page handlers

def _record_outputs(record: dict | None, stats: dict) -> tuple:
    """Values for RECORD_FIELDS: the editor filled from one record, or the empty queue."""
    if record is None:
        return (None, 0, gr.update(value=None, visible=True), gr.update(value=None, visible=False),
                "**Your queue is empty**: every record available to you is done or claimed by "
                "someone else. Come back later or choose another dataset.",
                suggestions_frame([]), gr.update(choices=[], value=None), "",
                history_frame([]), progress_html(stats), "")
    from annotation import workflow

    response = record.get("response") or {}
    best = best_suggestion(record["suggestions"]) or {}
    info = (f"**Record #{record['sample_id']}** · {html.escape(record['dataset'])} · split "
            f"{record.get('split') or '?'} · ground truth "
            f"**{html.escape(record.get('label') or 'none')}**")
    if response:
        info += f" · your {response['status']} (version {response['version']})"
    if record.get("notice"):  # the user's own draft on a record others have filled since
        info += f"\n\n⚠️ {html.escape(record['notice'])}."
    return (record["sample_id"], response.get("version", 0),
            *_viewer(record["media_path"], record["modality"]), info,
            suggestions_frame(record["suggestions"]),
            gr.update(choices=record["label_set"],
                      value=response.get("label") or best.get("label")),
            response.get("explanation") or best.get("explanation") or "",
            history_frame(workflow.history(record["sample_id"])), progress_html(stats), "")


@handle_errors
def load_next(token: str | None, dataset: str | None):
    who = require(token, "annotator")
    if not dataset:
        raise UserError("Choose a dataset first.")
    from annotation import workflow

    record = workflow.next_record(who.user_id, dataset)
    return _record_outputs(record, workflow.progress(dataset, user=who.user_id))


def conflict_html(current: dict) -> str:
    return ("<div class='emo-conflict'><b>This record was saved meanwhile</b> by "
            f"{html.escape(str(current.get('user') or 'another session'))} (version "
            f"{current.get('version')}, {html.escape(str(current.get('status')))}): label "
            f"<b>{html.escape(str(current.get('label') or 'none'))}</b>, text "
            f"“{html.escape(current.get('explanation') or '')}”.<br>Your text is still in the "
            "editor (and in the history). Compare, then save again to replace that version.</div>")


@handle_errors
def save_from_editor(token: str | None, sample_id: float | None, version: float | None,
                     label: str | None, explanation: str, status: str, dataset: str | None,
                     advance: bool):
    who = require(token, "annotator")
    if sample_id is None:
        raise UserError("Load a record first (Next record).")
    from annotation import workflow

    try:
        saved = workflow.save(who.user_id, int(sample_id), label, explanation, status,
                              expected_version=int(version or 0))
    except workflow.ConflictError as exc:
        # The newer version becomes the base, so saving again is a deliberate overwrite.
        return _updates(version=exc.current.get("version", gr.skip()),
                        message=conflict_html(exc.current))
    except workflow.ClaimRefused as exc:  # the editor keeps its text; only the message changes
        return _updates(message=f"<div class='emo-conflict'>{html.escape(str(exc))}.</div>")
    stats = workflow.progress(dataset, user=who.user_id) if dataset else {}
    message = f"{DONE[saved['status']]}: record #{saved['sample_id']}, version {saved['version']}."
    if saved["status"] != "draft" and advance and dataset:
        outputs = _record_outputs(workflow.next_record(who.user_id, dataset), stats)
        return (*outputs[:-1], message + " Here is the next one.")
    return _updates(version=saved["version"], message=message,
                    history=history_frame(workflow.history(saved["sample_id"])),
                    progress=progress_html(stats) if stats else gr.skip())


def _updates(**changed) -> tuple:
    """Outputs for RECORD_FIELDS that change only the named fields."""
    return tuple(changed.get(name, gr.skip()) for name in RECORD_FIELDS)


@handle_errors
def ask_model(token: str | None, sample_id: float | None, shown: pd.DataFrame | None):
    """Run the serving model on the record; its answer joins the suggestions on screen."""
    require(token, "annotator")
    if sample_id is None:
        raise UserError("Load a record first (Next record).")
    from annotation import workflow

    path, aligned = workflow.sample_media(int(sample_id))
    result = engine().predict(path, explain=True, aligned=aligned)
    row = pd.DataFrame([[f"model:{result.get('model_version')}", result.get("label") or "",
                         result.get("explanation") or result.get("note") or ""]],
                       columns=SUGGESTION_COLUMNS)
    frame = pd.concat([shown, row], ignore_index=True) if shown is not None and len(shown) else row
    return frame


@handle_errors
def load_review(token: str | None, dataset: str | None):
    who = require(token, "reviewer")
    if not dataset:
        raise UserError("Choose a dataset first.")
    from annotation import workflow

    item = workflow.next_review(who.user_id, dataset)
    if item is None:
        return (None, None, gr.update(value=None), gr.update(value=None, visible=False),
                "**Nothing to review** in this dataset right now.", "", gr.skip())
    info = (f"**Record #{item['sample_id']}** by **{html.escape(item['user'])}** · ground truth "
            f"**{html.escape(item.get('ground_truth') or 'none')}** · their label "
            f"**{html.escape(item.get('label') or '')}**")
    return (item["response_id"], item["version"], *_viewer(item["media_path"], item["modality"]),
            info, item.get("explanation") or "", "")


@handle_errors
def decide(token: str | None, response_id: float | None, version: float | None, decision: str,
           comment: str):
    who = require(token, "reviewer")
    if response_id is None:
        raise UserError("Load a correction to review first (Next to review).")
    from annotation import workflow

    done = workflow.review(who.user_id, int(response_id), decision, comment,
                           expected_version=int(version) if version is not None else None)
    return (None, None, None, f"{done['decision'].capitalize()} correction "
            f"#{done['response_id']}. Press **Next to review** for the next one.", "", "")


# ------------------------------------------------------------------------- layout

def create_annotate_tab(page: Page) -> dict:
    token, concurrency = page.token, page.concurrency
    locked = gr.Markdown("🔒 Sign in as an **annotator** (or reviewer/admin) to correct "
                         "explanations.", elem_classes=["emo-locked"])
    with gr.Column(visible=False, elem_id="annotate-panel") as panel:
        with gr.Row(equal_height=True):
            dataset = server_choices("Dataset", scale=2,
                                  elem_id="annotate-dataset")
            next_btn = gr.Button("Next record", variant="primary", scale=0, min_width=140,
                                 elem_id="annotate-next")
            advance = gr.Checkbox(label="Next record after Submit / Discard", value=True,
                                  scale=1, elem_id="annotate-advance")
            progress = gr.HTML(elem_id="annotate-progress")
        sample_id = gr.Number(visible=False, precision=0)
        version = gr.Number(visible=False, precision=0)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = gr.Image(label="Record", interactive=False, height=360,
                                 elem_id="annotate-image")
                video = gr.Video(label="Record", interactive=False, visible=False, height=360)
                info = gr.Markdown("Choose a dataset and press **Next record** to start.",
                                   elem_id="annotate-info")
                suggestions = gr.Dataframe(headers=SUGGESTION_COLUMNS, interactive=False,
                                           wrap=True, label="Suggestions (machine text, "
                                           "never edited)", elem_id="annotate-suggestions")
                model_btn = gr.Button("Ask the serving model", size="sm")
            with gr.Column(scale=6, elem_id="annotate-editor"):
                label = gr.Radio(choices=[], label="Label (keys 1–9)", elem_id="annotate-label")
                explanation = gr.Textbox(label="Explanation: pre-filled from the best "
                                         "suggestion; cite the facial evidence", lines=7,
                                         elem_id="annotate-text")
                with gr.Row():
                    draft_btn = gr.Button("Save draft", elem_id="annotate-draft")
                    submit_btn = gr.Button("Submit", variant="primary",
                                           elem_id="annotate-submit")
                    discard_btn = gr.Button("Discard", variant="stop",
                                            elem_id="annotate-discard")
                message = gr.HTML(elem_id="annotate-message")
                gr.HTML("<div class='emo-kbd emo-meta'><kbd>Ctrl</kbd>+<kbd>Enter</kbd> submit "
                        "· <kbd>Ctrl</kbd>+<kbd>S</kbd> save draft · <kbd>1</kbd>–<kbd>9</kbd> "
                        "label (outside the text box)</div>")
        with gr.Accordion("History of this record", open=True):
            history = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, wrap=True,
                                   elem_id="annotate-history")
    with gr.Column(visible=False, elem_id="review-panel") as review_panel:
        gr.Markdown("### Review queue")
        with gr.Row(equal_height=True):
            review_dataset = server_choices("Dataset", scale=2)
            review_next = gr.Button("Next to review", scale=0, min_width=150,
                                    elem_id="review-next")
        response_id = gr.Number(visible=False, precision=0)
        response_version = gr.Number(visible=False, precision=0)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                review_image = gr.Image(label="Record", interactive=False, height=280)
                review_video = gr.Video(label="Record", interactive=False, visible=False,
                                        height=280)
            with gr.Column(scale=6):
                review_info = gr.Markdown()
                review_text = gr.Textbox(label="Their explanation", lines=5, interactive=False)
                comment = gr.Textbox(label="Comment (optional)", lines=2)
                with gr.Row():
                    accept = gr.Button("Accept", variant="primary")
                    reject = gr.Button("Reject", variant="stop")

    record_outputs = [sample_id, version, image, video, info, suggestions, label, explanation,
                      history, progress, message]  # RECORD_FIELDS
    private = {"api_visibility": "private"}
    next_btn.click(load_next, inputs=[token, dataset], outputs=record_outputs, **private)
    for button, status in ((draft_btn, "draft"), (submit_btn, "submitted"),
                           (discard_btn, "discarded")):
        button.click(save_from_editor,
                     inputs=[token, sample_id, version, label, explanation, gr.State(status),
                             dataset, advance],
                     outputs=record_outputs, **private)
    model_btn.click(ask_model, inputs=[token, sample_id, suggestions], outputs=suggestions,
                    concurrency_id=MODEL_GROUP, concurrency_limit=concurrency, **private)
    review_next.click(load_review, inputs=[token, review_dataset],
                      outputs=[response_id, response_version, review_image, review_video,
                               review_info, review_text, comment], **private)
    for button, decision in ((accept, "accepted"), (reject, "rejected")):
        button.click(decide, inputs=[token, response_id, response_version, gr.State(decision),
                                     comment],
                     outputs=[response_id, review_image, review_video, review_info, review_text,
                              comment], **private)

    gr.api(api_next_record, api_name="next_record")
    gr.api(api_save_annotation, api_name="save_annotation")
    gr.api(api_record_history, api_name="record_history")
    gr.api(api_review, api_name="review_annotation")
    return {"panel": panel, "gates": [
        (locked, "annotator", "locked"), (panel, "annotator", "content"),
        (review_panel, "reviewer", "content"), (dataset, "annotator", "datasets"),
        (review_dataset, "reviewer", "datasets")]}
