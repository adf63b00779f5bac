"""Turning prediction JSON into things a person can read: drawn faces, charts, banners, tables.

Every string that came from a model, a user or a file name is escaped before it reaches an
HTML component; text panels use gr.Textbox, which never renders HTML.
"""
from __future__ import annotations

import html
import re
from typing import Iterable

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

BOX_COLOR = (255, 196, 0)
LANDMARK_COLOR = (0, 220, 255)
TAG_TEXT = (20, 20, 20)


def top_label(scores: dict[str, float] | None) -> tuple[str, float] | None:
    if not scores:
        return None
    label = max(scores, key=scores.get)
    return label, float(scores[label])


def draw_faces(rgb: np.ndarray | Image.Image, faces: Iterable[dict]) -> Image.Image:
    """The image with each face's box, its five landmarks and its prior's top expression."""
    image = rgb.copy() if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    # Line width and font follow the image size so boxes read the same on 200 px and 4000 px.
    scale = max(image.size) / 512
    width = max(2, round(3 * scale))
    radius = max(2, round(3 * scale))
    font = ImageFont.load_default(size=max(11, round(16 * scale)))
    for index, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = face["box"]
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOR, width=width)
        for x, y in face.get("landmarks") or []:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=LANDMARK_COLOR)
        best = top_label(face.get("prior"))
        tag = f"#{index} {best[0]} {best[1]:.0%}" if best else f"#{index}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tag_h = bottom - top + 2 * width
        ty = y1 - tag_h if y1 - tag_h >= 0 else y2
        draw.rectangle([x1, ty, x1 + right - left + 2 * width, ty + tag_h], fill=BOX_COLOR)
        draw.text((x1 + width, ty + width - top), tag, fill=TAG_TEXT, font=font)
    return image


def scores_frame(scores: dict[str, float] | None) -> pd.DataFrame:
    """Label probabilities as the two-column frame gr.BarPlot draws, most likely first."""
    rows = sorted((scores or {}).items(), key=lambda kv: -kv[1])
    return pd.DataFrame({"expression": [k for k, _ in rows],
                         "probability": [round(float(v), 4) for _, v in rows]})


def label_value(result: dict) -> dict | str | None:
    """What gr.Label shows: the probabilities, or a plain sentence when there is no label."""
    if result.get("label") is None:
        return None
    return {k: float(v) for k, v in (result.get("scores") or {}).items()} or result["label"]


FACE_COLUMNS = ["face", "frame", "box (x1, y1, x2, y2)", "detector score", "prior: top expression",
                "age / gender / race (AGR)"]


def faces_frame(faces: list[dict]) -> pd.DataFrame:
    """One row per detected face: where, how sure, what the prior network sees, AGR."""
    rows = []
    for index, face in enumerate(faces, start=1):
        best = top_label(face.get("prior"))
        attrs = face.get("attributes")
        rows.append([
            index,
            "" if face.get("frame") is None else int(face["frame"]),
            ", ".join(f"{v:.0f}" for v in face["box"]),
            round(float(face.get("score", 0.0)), 3),
            f"{best[0]} ({best[1]:.0%})" if best else "",
            attributes_text(attrs),
        ])
    return pd.DataFrame(rows, columns=FACE_COLUMNS)


def attributes_text(attrs: dict | None) -> str:
    """The AGR cell: what the attribute network said, and plainly what it did not estimate."""
    if not attrs:
        # No attribute network configured, or it was not asked (a tiny or doubtful face).
        return "not estimated"
    age = str(attrs.get("age") or "") or "age not estimated"
    if attrs.get("age_years") is not None:
        age += f" (≈{float(attrs['age_years']):.0f})"
    gender = str(attrs.get("gender") or "") or "gender not estimated"
    if attrs.get("gender_probability") is not None:
        gender += f" ({float(attrs['gender_probability']):.0%})"
    # The default network estimates age and gender only; no race network is available offline.
    race = str(attrs.get("race") or "") or "race not estimated"
    return " / ".join((age, gender, race))


def timings_text(timings: dict | None) -> str:
    if not timings:
        return ""
    parts = [f"{name} {float(ms):.0f} ms" for name, ms in timings.items()
             if isinstance(ms, (int, float))]
    return " · ".join(parts)


def mode_banner(info: dict | None) -> str:
    """The HTML strip at the top of the page that says which model answers (escaped)."""
    if not info:
        return ""
    mode = info.get("mode", "")
    version = html.escape(str(info.get("model_version") or "unknown"))
    # The engine's note is the authority on what the mode means; `code` spans become <code>.
    note = html.escape(str(info.get("note") or ""))
    note = re.sub(r"`([^`]+)`", r"<code>\1</code>", note)
    title, css = {"prior-only": ("Prior-only mode", "emo-banner-warn"),
                  "zero-shot": ("Zero-shot", "emo-banner-warn"),
                  "tiny-test-fixture": ("Tiny test fixture", "emo-banner-danger")}.get(
        mode, ("EMO-LLaMA", "emo-banner-ok"))
    body = note or f"Serving model version <b>{version}</b>."
    return f"<div class='emo-banner {css}'><b>{title}</b> · {version} — {body}</div>"


MODE_BADGES = {"prior-only": " <span class='emo-badge emo-badge-warn'>prior-only mode</span>",
               "zero-shot": " <span class='emo-badge emo-badge-warn'>zero-shot</span>",
               "tiny-test-fixture": " <span class='emo-badge emo-badge-danger'>tiny test "
                                    "fixture</span>"}


def result_summary(result: dict) -> str:
    """One escaped HTML line: the label (or why there is none), the version, the face count."""
    faces = result.get("faces") or []
    if result.get("label") is None:
        why = html.escape(result.get("note") or "no label")
        head = f"<span class='emo-nolabel'>No label</span> — {why}"
    else:
        best = top_label(result.get("scores"))
        share = f" ({best[1]:.0%})" if best else ""
        head = f"<span class='emo-label'>{html.escape(result['label'])}</span>{share}"
    count = f"{len(faces)} face{'s' if len(faces) != 1 else ''}"
    version = html.escape(str(result.get("model_version") or ""))
    badge = MODE_BADGES.get(result.get("mode"), "")
    agr = result.get("agr_sentence")
    attrs = next((f["attributes"] for f in faces if f.get("attributes")), None) or {}
    no_race = "" if attrs.get("race") else " (race is not estimated)"
    agr_line = (f"<div class='emo-meta emo-agr'>The prompt's AGR sentence: {html.escape(agr)}"
                f"{no_race}</div>" if agr else "")
    return (f"<div class='emo-summary'>{head}<span class='emo-meta'>{count} · model "
            f"{version}{badge}</span>{agr_line}</div>")


def result_values(result: dict) -> tuple:
    """Values for the panels `prediction_panels` builds (summary first), from one result."""
    faces = result.get("faces") or []
    return (result_summary(result), label_value(result), scores_frame(result.get("scores")),
            faces_frame(faces), timings_text(result.get("timings_ms")))


def prediction_panels(tab: str, faces_label: str) -> tuple:
    """The panels the Image and Video tabs share below their main view.

    Returns (label, chart, faces, timings, prediction); `tab` names their elem_ids and the
    API endpoint the JSON accordion mentions.
    """
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            label = gr.Label(label="Expression", num_top_classes=3, elem_id=f"{tab}-label")
        with gr.Column(scale=7):
            # No `height=`: with a label shown, Gradio 6.31 then cuts off the x axis.
            chart = gr.BarPlot(x="expression", y="probability", y_lim=[0, 1], sort="-y",
                               label="Label probabilities", elem_id=f"{tab}-chart")
    faces = gr.Dataframe(headers=FACE_COLUMNS, label=faces_label, interactive=False, wrap=True)
    timings = gr.Textbox(label="Timings", interactive=False, max_lines=1)
    with gr.Accordion(f"Prediction JSON (what /predict_{tab} returns)", open=False):
        prediction = gr.JSON(label="Prediction")
    return label, chart, faces, timings, prediction
