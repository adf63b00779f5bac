"""The Data tab (admin): import a dataset, generate Gemini instructions, export a snapshot.
Each runs as a job (annotation/jobs.py) in its own process: the button starts it and returns
at once with its number, a gr.Timer follows its progress, and its summary is drawn from the
job's stored result when it is done. A reload (or a restart) shows each section's latest job
again, running or finished; the Jobs tab lists them all.

Each action is also an API endpoint that takes the session token first: the start_* ones return
the job number (follow it with /job_status), the others wait for the job and answer with its
result, e.g.

    job = Client(url).predict(token, "rafdb", "/data/RAF-DB", "rafdb", api_name="/start_import_dataset")
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
from annotation.jobs import ACTIVE
from core.errors import UserError
from webapp.auth import require
from webapp.components.common import Page, handle_errors, server_choices
from webapp.components.compare import NO_KEY_MESSAGE, gemini_configured
from webapp.components.jobs import (POLL_SECONDS, follow_state, import_job_args, job_line,
                                    latest_job, run_and_follow)

GEMINI_GROUP = "gemini-job"
SECTIONS = ("import", "generate", "export")   # each follows its latest job of that kind


def _counts_frame(counts: dict | None, key: str) -> pd.DataFrame:
    rows = sorted((counts or {}).items(), key=lambda kv: -kv[1])
    return pd.DataFrame(rows, columns=[key, "samples"])


def _generate_args(dataset: str | None, limit: float | None, model: str | None) -> dict:
    if not dataset:
        raise UserError("Choose a dataset.")
    return {"dataset": dataset, "limit": int(limit) if limit else None,
            "model": (model or "").strip() or None}


def _export_args(dataset: str | None, include_suggestions: bool) -> dict:
    if not dataset:
        raise UserError("Choose a dataset to export.")
    return {"dataset": dataset, "include_suggestions": bool(include_suggestions)}


def _start(kind: str, args: dict) -> tuple[int, str]:
    from annotation import jobs

    job_id = jobs.start_job(kind, args)
    return job_id, job_line(jobs.job_status(job_id), kind)


@handle_errors
def start_import(token: str | None, fmt: str, path: str, name: str, split: str | None = "auto",
                 aligned: str | None = "auto"):
    """/start_import_dataset: start an import job (admin); returns its number at once (and
    the section's status line). Arguments as /import_dataset."""
    require(token, "admin")
    return (*_start("import", import_job_args(fmt, path, name, split, aligned)), "")


@handle_errors
def start_generate(token: str | None, dataset: str | None, limit: float | None, model: str):
    """/start_generate_instructions: start a Gemini job over a dataset (admin); its number."""
    require(token, "admin")
    return (*_start("generate", _generate_args(dataset, limit, model)), "")


@handle_errors
def start_export(token: str | None, dataset: str | None, include_suggestions: bool):
    """/start_export_snapshot: start an export job (admin); its number."""
    require(token, "admin")
    return (*_start("export", _export_args(dataset, include_suggestions)), "")


@handle_errors
def import_data(token: str | None, fmt: str, path: str, name: str, split: str | None = "auto",
                aligned: str | None = "auto", progress: gr.Progress = gr.Progress()):
    """/import_dataset: read a dataset folder on the server into the store (admin only); waits
    for the job and answers with its summary (the page's button uses /start_import_dataset).

    `split`: "auto" (as the layout says) or train/val/test; `aligned`: "auto" (the format's
    default), "yes" (face crops) or "no". Only paths inside the import folders.
    """
    require(token, "admin")
    return import_outputs(run_and_follow("import", import_job_args(fmt, path, name, split, aligned),
                                         progress))


def import_outputs(summary: dict) -> tuple:
    """The import's summary text and its by-label, by-split and broken tables."""
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
    """/generate_instructions: a resumable Gemini job over a dataset; waits for it and answers
    with its summary (the page's button uses /start_generate_instructions)."""
    require(token, "admin")
    summary = run_and_follow("generate", _generate_args(dataset, limit, model), progress)
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
    """/export_snapshot: an immutable, content-hashed snapshot of the corrections (admin);
    waits for the job (the page's button uses /start_export_snapshot)."""
    require(token, "admin")
    return export_text(run_and_follow("export", _export_args(dataset, include_suggestions)))


def export_text(snap: dict) -> str:
    splits = ", ".join(f"{split} {n}" for split, n in snap["counts"].items())
    sources = ", ".join(f"{kind} {n}" for kind, n in snap["sources"].items() if n)
    reused = " The data had not changed: this is the existing snapshot." if snap["reused"] else ""
    return (f"Snapshot **#{snap['id']}** of {html.escape(snap['dataset'])}: {snap['n_samples']} "
            f"samples ({splits}; from {sources}), hash `{snap['content_hash'][:12]}`, folder "
            f"`{html.escape(str(snap['path']))}`.{reused} Train on it in the Fine-tune tab.")


RENDER = {"import": import_outputs, "generate": lambda summary: (summary_text(summary), summary),
          "export": lambda snap: (export_text(snap),)}
N_OUTPUTS = {"import": 4, "generate": 2, "export": 1}   # result outputs per section


def poll(token: str | None, import_job: int | None, generate_job: int | None,
         export_job: int | None, seen: dict | None):
    """The timer: each section's job line, and its summary once, when the job is done.

    `seen` is {kind: [job, status]} as this page last showed them: a finished job already on
    screen sends nothing (its summary stays); a job that just finished sends its summary, drawn
    from the job's stored result (also after a reload: the result lives in the store)."""
    try:
        require(token, "admin")
    except UserError:
        return tuple(gr.skip() for _ in range(sum(N_OUTPUTS.values()) + len(SECTIONS) + 1))
    seen = dict(seen or {})
    out: list = []
    for kind, job_id in zip(SECTIONS, (import_job, generate_job, export_job)):
        status, now, fresh = follow_state(job_id, seen.get(kind))
        if status is None or (now == seen.get(kind) and now[1] not in ACTIVE):
            out += [gr.skip()] * (1 + N_OUTPUTS[kind])
            continue
        out.append(job_line(status, kind))
        out += list(RENDER[kind](status["result"])) if fresh else [gr.skip()] * N_OUTPUTS[kind]
        seen[kind] = now
    return (*out, seen)


def restore(token: str | None):
    """On sign-in, load and tab opening: each section follows its latest job again."""
    try:
        require(token, "admin")
    except UserError:
        return tuple(gr.skip() for _ in range(len(SECTIONS) + 1))
    return (*[latest_job(kind) for kind in SECTIONS], {})


def create_data_tab(page: Page) -> dict:
    token = page.token
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
                fmt = gr.Dropdown(list(FORMATS), value="folder", label="Format", scale=1)
                path = gr.Textbox(label="Path on the server", scale=3,
                                  placeholder="/data/RAF-DB/basic", elem_id="data-import-path")
                name = gr.Textbox(label="Dataset name", scale=1,
                                  placeholder="default: the folder name", elem_id="data-import-name")
                run_import = gr.Button("Import", variant="primary", scale=0, min_width=110,
                                       elem_id="data-import")
            with gr.Row(equal_height=True):
                split = gr.Dropdown([("as the layout says (default train)", "auto"), "train",
                                     "val", "test"], value="auto", label="Split", scale=1,
                                    info="for a folder without train/ val/ test/; else: import "
                                         "only this split")
                aligned = gr.Dropdown([("the format's default", "auto"),
                                       ("yes: every image is a face crop", "yes"), ("no", "no")],
                                      value="auto", label="Face crops", scale=1,
                                      info="fer2013, ferplus, RAF-DB aligned/: yes by default")
            import_job = gr.Markdown(elem_id="data-import-job")
            import_text = gr.Markdown(elem_id="data-import-result")
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
            gen_job = gr.Markdown(elem_id="data-generate-job")
            gen_text = gr.Markdown(elem_id="data-generate-result")
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
            export_job = gr.Markdown(elem_id="data-export-job")
            export_text = gr.Markdown(elem_id="data-export-result")
    # The job each section follows (its latest, after a reload) and what the page last showed.
    followed = {kind: gr.State(None) for kind in SECTIONS}
    seen = gr.State(None)
    timer = gr.Timer(POLL_SECONDS, active=False)

    # The buttons start a job and return at once; the timer follows it.
    run_import.click(start_import, inputs=[token, fmt, path, name, split, aligned],
                     outputs=[followed["import"], import_job, import_text],
                     api_name="start_import_dataset")
    run_gen.click(start_generate, inputs=[token, gen_dataset, limit, model],
                  outputs=[followed["generate"], gen_job, gen_text],
                  api_name="start_generate_instructions")
    run_export.click(start_export, inputs=[token, exp_dataset, with_suggestions],
                     outputs=[followed["export"], export_job, export_text],
                     api_name="start_export_snapshot")
    timer.tick(poll, inputs=[token, *followed.values(), seen],
               outputs=[import_job, import_text, by_label, by_split, broken, gen_job, gen_text,
                        gen_json, export_job, export_text, seen],
               show_progress="hidden", api_visibility="private")
    show_batches.click(batch_jobs, inputs=[token, gen_dataset],
                       outputs=[batch_text, batch_table, batch_json], api_name="batch_jobs")
    # For scripts: the same jobs, answering with their result (buttons no one sees).
    hidden = {kind: gr.Button(visible=False) for kind in SECTIONS}
    hidden["import"].click(import_data, inputs=[token, fmt, path, name, split, aligned],
                           outputs=[import_text, by_label, by_split, broken], api_name="import_dataset")
    hidden["generate"].click(generate, inputs=[token, gen_dataset, limit, model],
                             outputs=[gen_text, gen_json], api_name="generate_instructions",
                             concurrency_id=GEMINI_GROUP, concurrency_limit=1)
    hidden["export"].click(export, inputs=[token, exp_dataset, with_suggestions],
                           outputs=export_text, api_name="export_snapshot")
    return {"panel": panel,
            "on_access": (restore, [*followed.values(), seen]),
            "gates": [(locked, "admin", "locked"), (panel, "admin", "content"),
                      (timer, "admin", "timer"),
                      (gen_dataset, "admin", "datasets"), (exp_dataset, "admin", "datasets")]}
