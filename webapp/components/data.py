"""The Data tab (admin): import a dataset, generate Gemini instructions, export a snapshot.
Each runs as a job (annotation/jobs.py) in its own process; the button waits for its result
and the Jobs tab lists it, across a reload.

Each action is also an API endpoint that takes the session token first, e.g.

    Client(url).predict(token, "rafdb", "/data/RAF-DB", "rafdb", api_name="/import_dataset")

Imports read only paths inside the import folders (`EMO_IMPORT_ROOTS`; by default the data dir
and `imports/` beside the app): an admin's browser must not be a way to read any server file.
"""
from __future__ import annotations

import html
import os

import gradio as gr
import pandas as pd

from annotation.formats import FORMATS
from annotation.import_roots import check_import_path
from core.errors import UserError
from webapp.auth import require
from webapp.components.common import handle_errors, server_choices
from webapp.components.compare import NO_KEY_MESSAGE, gemini_configured
from webapp.components.jobs import run_and_follow

GEMINI_GROUP = "gemini-job"


def _counts_frame(counts: dict | None, key: str) -> pd.DataFrame:
    rows = sorted((counts or {}).items(), key=lambda kv: -kv[1])
    return pd.DataFrame(rows, columns=[key, "samples"])


@handle_errors
def import_data(token: str | None, fmt: str, path: str, name: str, split: str | None = "auto",
                aligned: str | None = "auto", progress: gr.Progress = gr.Progress()):
    """/import_dataset: read a dataset folder on the server into the store (admin only).

    `split`: "auto" (as the layout says) or train/val/test; `aligned`: "auto" (the format's
    default), "yes" (face crops) or "no". Only paths inside the import folders.
    """
    require(token, "admin")
    if not (path or "").strip():
        raise UserError("Enter the dataset's folder (or CSV file) path on the server.")
    if split not in (None, "", "auto", "train", "val", "test"):
        raise UserError("Split must be auto, train, val or test.")
    if aligned not in (None, "", "auto", "yes", "no"):
        raise UserError("Face crops must be auto, yes or no.")
    check_import_path(path.strip(), confined=True)   # refused at once, before any process
    # An import job: its own process does the work (and goes on if the page reloads; the Jobs
    # tab follows it); this handler mirrors its progress and shows its summary.
    summary = run_and_follow("import", {"fmt": fmt, "path": path.strip(),
                                        "name": (name or "").strip() or None,
                                        "split": None if split in (None, "", "auto") else split,
                                        "aligned": {"yes": True, "no": False}.get(aligned or "auto"),
                                        "confined": True}, progress)
    broken = pd.DataFrame([(b["where"], b["reason"]) for b in summary["broken"]],
                          columns=["row or file", "reason"])
    lines = [f"**{html.escape(summary['dataset'])}** ({summary['format']}, {summary['modality']}): "
             f"{summary['added']} added, {summary['skipped']} already there, "
             f"{len(summary['broken'])} broken."]
    lines += [f"Left out: {count} × {html.escape(reason)}"
              for reason, count in sorted(summary["excluded"].items())]
    lines += [f"Note: {html.escape(note)}" for note in summary["notes"]]
    return ("\n\n".join(lines), _counts_frame(summary["by_label"], "label"),
            _counts_frame(summary["by_split"], "split"), broken)


@handle_errors
def generate(token: str | None, dataset: str | None, limit: float | None, model: str,
             progress: gr.Progress = gr.Progress()):
    """/generate_instructions: a resumable Gemini job over a dataset, with live progress."""
    require(token, "admin")
    if not dataset:
        raise UserError("Choose a dataset.")
    # A generate job (its own process; listed in the Jobs tab, goes on across a reload).
    summary = run_and_follow("generate", {"dataset": dataset, "limit": int(limit) if limit else None,
                                          "model": (model or "").strip() or None}, progress)
    return summary_text(summary), summary


def summary_text(summary: dict) -> str:
    """The job's summary for people: counts, failures by reason, tokens and estimated cost."""
    lines = [f"**{summary['ok']}** suggestions stored, **{summary['rejected']}** rejected, "
             f"**{summary['failed']}** calls failed; {summary['skipped']} already done, "
             f"{summary['unlabelled']} without a ground-truth label (skipped)."]
    for title, key in (("Rejected", "rejected_by_reason"), ("Failed", "failed_by_reason")):
        if summary.get(key):
            lines.append(f"{title}: " + ", ".join(f"{html.escape(str(reason))} × {n}"
                                                  for reason, n in summary[key].items()))
    cost = summary.get("estimated_cost_usd")
    lines.append(f"{summary['requests']} requests · tokens {summary['input_tokens']:,} in / "
                 f"{summary['output_tokens']:,} out · estimated cost "
                 + (f"**${cost:.4f}**" if cost is not None else "unknown")
                 + f" ({html.escape(summary.get('cost_note', ''))}).")
    return "\n\n".join(lines)


BATCH_COLUMNS = ["batch", "state", "requests", "ok", "rejected", "failed", "est. cost USD",
                 "created"]


@handle_errors
def batch_jobs(token: str | None, dataset: str | None):
    """/batch_jobs: the dataset's Gemini Batch API jobs as the store last saw them (admin).

    No call to Google: `python app.py generate --dataset NAME --batch-status` polls a job."""
    require(token, "admin")
    if not dataset:
        raise UserError("Choose a dataset.")
    from annotation.gemini.batch import list_batches

    jobs = list_batches(dataset)
    rows = [[job["batch"] or job["display_name"], job["state"] + ("" if job["ingested"] else
                                                                  " (open)"),
             job["requests"], job["ok"], job["rejected"], job["failed"],
             job["estimated_cost_usd"] if job["ingested"] else job["estimated_input_cost_usd"],
             (job["created_at"] or "")[:19]] for job in jobs]
    open_jobs = [job for job in jobs if not job["ingested"]]
    text = (f"{len(jobs)} batch job(s) for **{html.escape(dataset)}**"
            + (f"; open: `{html.escape(open_jobs[0]['batch'] or open_jobs[0]['display_name'])}` "
               f"({open_jobs[0]['state']}). Poll it with `python app.py generate --dataset "
               f"{html.escape(dataset)} --batch-status`." if open_jobs else ".")
            + " Costs are estimates at batch prices (half the list price); an open job shows "
              "its input estimate.")
    return text, pd.DataFrame(rows, columns=BATCH_COLUMNS), jobs


@handle_errors
def export(token: str | None, dataset: str | None, include_suggestions: bool) -> str:
    """/export_snapshot: an immutable, content-hashed snapshot of the corrections (admin)."""
    require(token, "admin")
    if not dataset:
        raise UserError("Choose a dataset to export.")
    snap = run_and_follow("export", {"dataset": dataset,
                                     "include_suggestions": bool(include_suggestions)})
    splits = ", ".join(f"{split} {n}" for split, n in snap["counts"].items())
    sources = ", ".join(f"{kind} {n}" for kind, n in snap["sources"].items() if n)
    reused = " The data had not changed: this is the existing snapshot." if snap["reused"] else ""
    return (f"Snapshot **#{snap['id']}** of {html.escape(snap['dataset'])}: {snap['n_samples']} "
            f"samples ({splits}; from {sources}), hash `{snap['content_hash'][:12]}`, folder "
            f"`{html.escape(str(snap['path']))}`.{reused} Train on it in the Fine-tune tab.")


def create_data_tab(token: gr.BrowserState) -> dict:
    locked = gr.Markdown("🔒 Sign in as an **admin** to import datasets, run Gemini and export "
                         "snapshots.", elem_classes=["emo-locked"])
    with gr.Column(visible=False, elem_id="data-panel") as panel:
        with gr.Accordion("1 · Import a dataset", open=True):
            # No server paths here: the layout reaches every visitor, signed in or not.
            gr.Markdown("Reads a dataset already on the server, inside the import folders "
                        "(`EMO_IMPORT_ROOTS`; by default the data dir and `imports/` beside the "
                        "app). Re-importing adds nothing twice; broken files are listed, never "
                        "fatal.")
            with gr.Row(equal_height=True):
                fmt = gr.Dropdown(FORMATS, value="folder", label="Format", scale=1)
                path = gr.Textbox(label="Path on the server", scale=3,
                                  placeholder="/data/RAF-DB/basic")
                name = gr.Textbox(label="Dataset name", scale=1,
                                  placeholder="default: the folder name")
                run_import = gr.Button("Import", variant="primary", scale=0, min_width=110)
            with gr.Row(equal_height=True):
                split = gr.Dropdown([("as the layout says (default train)", "auto"), "train",
                                     "val", "test"], value="auto", label="Split", scale=1,
                                    info="for a folder without train/ val/ test/; else: import "
                                         "only this split")
                aligned = gr.Dropdown([("the format's default", "auto"),
                                       ("yes: every image is a face crop", "yes"), ("no", "no")],
                                      value="auto", label="Face crops", scale=1,
                                      info="fer2013, ferplus, RAF-DB aligned/: yes by default")
            import_text = gr.Markdown()
            with gr.Row(equal_height=False):
                by_label = gr.Dataframe(headers=["label", "samples"], label="By label",
                                        interactive=False)
                by_split = gr.Dataframe(headers=["split", "samples"], label="By split",
                                        interactive=False)
                broken = gr.Dataframe(headers=["row or file", "reason"], wrap=True,
                                      label="Broken rows / files", interactive=False)
        with gr.Accordion("2 · Gemini instruction data", open=True):
            gr.Markdown("The paper's pipeline: label + image → category instruction and an "
                        "explanation citing facial evidence. Resumable: a rerun pays for "
                        "nothing twice.")
            if not gemini_configured():
                gr.Markdown(f"⚠️ {NO_KEY_MESSAGE}", elem_classes=["emo-notice"])
            with gr.Row(equal_height=True):
                gen_dataset = server_choices("Dataset")
                limit = gr.Number(label="Limit (0 = all)", value=0, precision=0, minimum=0)
                model = gr.Textbox(label="Gemini model", placeholder=os.environ.get(
                    "GEMINI_MODEL", "gemini-2.5-flash"))
                run_gen = gr.Button("Generate", variant="primary", scale=0, min_width=110)
            gen_text = gr.Markdown()
            gen_json = gr.JSON(label="Job summary", visible=False)
            with gr.Row(equal_height=True):
                gr.Markdown("Whole datasets at half the price: `python app.py generate "
                            "--dataset NAME --batch` (Gemini's Batch API, answers within 24 h).")
                show_batches = gr.Button("Batch jobs", scale=0, min_width=110)
            batch_text = gr.Markdown()
            batch_table = gr.Dataframe(headers=BATCH_COLUMNS, label="Batch API jobs",
                                       interactive=False)
            batch_json = gr.JSON(visible=False)
        with gr.Accordion("3 · Export a snapshot", open=True):
            with gr.Row(equal_height=True):
                exp_dataset = server_choices("Dataset")
                with_suggestions = gr.Checkbox(label="Fall back to the suggestion where a "
                                               "record has no accepted correction")
                run_export = gr.Button("Export", variant="primary", scale=0, min_width=110,
                                       elem_id="data-export")
            export_text = gr.Markdown(elem_id="data-export-result")

    run_import.click(import_data, inputs=[token, fmt, path, name, split, aligned],
                     outputs=[import_text, by_label, by_split, broken], api_name="import_dataset")
    run_gen.click(generate, inputs=[token, gen_dataset, limit, model],
                  outputs=[gen_text, gen_json], api_name="generate_instructions",
                  concurrency_id=GEMINI_GROUP, concurrency_limit=1)
    show_batches.click(batch_jobs, inputs=[token, gen_dataset],
                       outputs=[batch_text, batch_table, batch_json], api_name="batch_jobs")
    run_export.click(export, inputs=[token, exp_dataset, with_suggestions], outputs=export_text,
                     api_name="export_snapshot")
    return {"panel": panel,
            "gates": [(locked, "admin", "locked"), (panel, "admin", "content"),
                      (gen_dataset, "admin", "datasets"), (exp_dataset, "admin", "datasets")]}
