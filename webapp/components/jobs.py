"""The Jobs tab (admin): every long job (import, Gemini generation, evaluation, export,
comparison table, fine-tune) in one table read from the database, so a page reload or a server
restart loses nothing; start an import, follow a job, cancel it.

    job = Client(url).predict(token, "folder", "/srv/imports/faces", "faces", api_name="/start_import_job")
    Client(url).predict(token, job, api_name="/job_status")   # {"status": "running", "done": 12, ...}
    Client(url).predict(token, job, api_name="/cancel_job")
    Client(url).predict(token, "ft-3", api_name="/job_status")  # fine-tune job 3

The jobs run in their own processes (annotation/jobs.py, annotation/finetune.py); this tab only
reads their rows and logs. Fine-tune jobs are listed as ft-<id>, progress in optimizer steps;
their own tab adds the loss curve and the publish gate. The Data and Fine-tune tabs' buttons
start jobs too and follow them with the helpers here (`start_job`, `job_line`).
"""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from annotation import jobs
from annotation.formats import FORMATS
from annotation.import_roots import check_import_path
from core.errors import UserError
from webapp.auth import require
from webapp.components.common import Page, handle_errors

POLL_SECONDS = 2.0
JOB_COLUMNS = ["job", "kind", "status", "progress", "what", "result / error", "created"]


def _what(status: dict) -> str:
    args = status["args"]
    if status["kind"] == "import":
        return f"{args.get('fmt')} {args.get('path')}" + (f" → {args['name']}" if args.get("name") else "")
    if status["kind"] == "evaluate":
        return f"{args.get('version')} on {args.get('dataset')}/{args.get('split', 'test')}"
    if status["kind"] == "table":
        return (f"{', '.join(map(str, args.get('versions') or []))} on "
                f"{', '.join(map(str, args.get('datasets') or []))}/{args.get('split', 'test')}")
    if status["kind"] == "finetune":
        return f"snapshot #{args.get('snapshot')}"
    return str(args.get("dataset", ""))


def _outcome(status: dict) -> str:
    if status["error"]:
        return status["error"]
    result = status["result"] or {}
    if status["kind"] == "import" and result:
        return (f"{result.get('added', 0)} added, {result.get('skipped', 0)} already there, "
                f"{len(result.get('broken', []))} broken")
    if status["kind"] == "evaluate" and "uar" in result:
        return f"UAR {result['uar']:.3f} · WAR {result['war']:.3f} · {result['n']} samples"
    if status["kind"] == "export" and result:
        return f"snapshot #{result.get('id')}: {result.get('n_samples')} samples"
    if status["kind"] == "generate" and result:
        return f"{result.get('ok', 0)} ok, {result.get('rejected', 0)} rejected, {result.get('failed', 0)} failed"
    if status["kind"] == "table" and result.get("rows"):
        failed = sum(bool(r.get("error")) for r in result["rows"])
        return (f"{len(result['rows'])} version(s) × {len(result.get('datasets', []))} dataset(s)"
                + (f", {failed} with errors" if failed else ""))
    if status["kind"] == "finetune" and result.get("version"):
        return f"version {result['version']}: {'published' if result.get('published') else 'not published'}"
    return ""


def progress_text(status: dict) -> str:
    if status["total"]:
        return f"{status['done']}/{status['total']} ({100 * status['done'] / status['total']:.0f}%)"
    return str(status["done"]) if status["done"] else ""


def jobs_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[r.get("ref", str(r["id"])), r["kind"], r["status"], progress_text(r), _what(r),
                          _outcome(r),
                          (r["created_at"] or "")[:19].replace("T", " ")] for r in rows],
                        columns=JOB_COLUMNS)


def follow_text(status: dict | None) -> str:
    if not status:
        return "Enter a job number and press Follow."
    text = (f"Job **#{status.get('ref', status['id'])}** ({status['kind']}, "
            f"{html.escape(_what(status))}): **{status['status']}**")
    if progress_text(status):
        text += f" · {progress_text(status)}"
    outcome = _outcome(status)
    if outcome:
        text += f"\n\n{'⚠️ ' if status['error'] else ''}{html.escape(outcome)}"
    return text


def for_client(value):
    """The status with every `path` key named `server_path`: gradio_client takes any dict with a
    `path` for a file to download (an import's folder, an export's snapshot folder)."""
    if isinstance(value, dict):
        return {("server_path" if k == "path" else k): for_client(v) for k, v in value.items()}
    if isinstance(value, list):
        return [for_client(v) for v in value]
    return value


def job_line(status: dict | None, what: str = "job") -> str:
    """One status line for a tab that follows its own latest job: number, state, progress,
    where to see it again (elem `data-job-status` etc.)."""
    if not status:
        return ""
    text = f"{what.capitalize()} job **#{status.get('ref', status['id'])}**: **{status['status']}**"
    if progress_text(status):
        text += f" · {progress_text(status)}"
    if status["status"] in jobs.ACTIVE:
        text += " — runs on if you leave or reload the page (Jobs tab)."
    elif status["error"]:
        text += f"\n\n⚠️ {html.escape(status['error'])}"
    return text


def latest_job(kind: str) -> int | None:
    """The newest job of a kind: what a tab follows again after a reload."""
    status = jobs.latest_job(kind)
    return None if status is None else status["id"]


def follow_state(job_id: int | None, seen: list | None) -> tuple[dict | None, list | None, bool]:
    """(status, [id, status] now, whether the job's result is new to this page) for a tab's
    timer: a finished job already on screen is read but renders nothing again."""
    if job_id in (None, ""):
        return None, None, False
    try:
        status = jobs.job_status(int(job_id))
    except UserError:   # a job of another store (the page outlived a restore)
        return None, None, False
    now = [status["id"], status["status"]]
    return status, now, now != seen and status["status"] == "done"


def _job_ref(job_id) -> str:
    """A job reference as the Job box holds it, checked: "12" (a job), "ft-3" (a fine-tune)."""
    kind, number = jobs.parse_job_ref(job_id)
    return f"{jobs.FINETUNE_PREFIX}{number}" if kind == "finetune" else str(number)


def run_and_follow(kind: str, args: dict, progress=None, unit: str = "samples") -> dict:
    """Run a job and wait for its result, mirroring its progress into `progress` (a gr.Progress):
    the API endpoints that answer with the result (/import_dataset, /evaluate_version ...) use
    it; the page's buttons start the job and follow it instead (`job_line`). The work happens
    in the job's process; a reload leaves it running and listed in the Jobs tab."""
    job_id = jobs.start_job(kind, args)

    def mirror(status: dict) -> None:
        if progress is not None and status["total"]:
            progress((status["done"], status["total"]), unit=unit, desc=f"job #{job_id}")

    status = jobs.wait_for_job(job_id, on_progress=mirror)
    if status["status"] != "done":
        raise UserError(status["error"] or f"{kind} job {job_id} was {status['status']}")
    return status["result"]


def import_job_args(fmt: str, path: str, name: str | None, split: str | None,
                    aligned: str | None) -> dict:
    """The import job's arguments, checked (the Data tab's Import and /start_import_job); a
    path outside the import folders is refused here, at once, not in a job process later."""
    if fmt not in FORMATS:
        raise UserError(f"Unknown format {fmt!r}.")
    if not (path or "").strip():
        raise UserError("Enter the dataset's folder (or CSV file) path on the server.")
    if split not in (None, "", "auto", "train", "val", "test"):
        raise UserError("Split must be auto, train, val or test.")
    if aligned not in (None, "", "auto", "yes", "no"):
        raise UserError("Face crops must be auto, yes or no.")
    check_import_path(path.strip(), confined=True)
    return {"fmt": fmt, "path": path.strip(), "name": (name or "").strip() or None,
            "split": None if split in (None, "", "auto") else split,
            "aligned": {"yes": True, "no": False}.get(aligned or "auto"), "confined": True}


@handle_errors
def start_import_job(token: str | None, fmt: str, path: str, name: str | None,
                     split: str | None = "auto", aligned: str | None = "auto") -> int:
    """/start_import_job: import a dataset in the background (admin); returns the job number.
    Only paths inside the import folders, as the Data tab's import."""
    require(token, "admin")
    return jobs.start_job("import", import_job_args(fmt, path, name, split, aligned))


@handle_errors
def job_status(token: str | None, job_id: str | None) -> dict:
    """/job_status: one job's status, progress, result or error (admin); as
    annotation.jobs.job_status, with `path` keys named `server_path`. "ft-3": fine-tune job 3."""
    require(token, "admin")
    return for_client(jobs.any_job_status(_job_ref(job_id)))


@handle_errors
def cancel_job(token: str | None, job_id: str | None) -> dict:
    """/cancel_job: stop a running job cleanly (admin); a fine-tune ("ft-3") saves a partial
    checkpoint first."""
    require(token, "admin")
    return for_client(jobs.cancel_any_job(_job_ref(job_id)))


@handle_errors
def list_jobs(token: str | None):
    """/list_jobs: the newest jobs as a table, and how many are running (admin)."""
    require(token, "admin")
    rows = jobs.list_all_jobs()
    running = sum(r["status"] in jobs.ACTIVE for r in rows)
    return jobs_frame(rows), f"{len(rows)} recent job(s), {running} running."


def poll(token: str | None, job_id: str | None):
    """The timer: the table and the followed job; quiet for visitors who are not admins."""
    try:
        require(token, "admin")
    except UserError:
        return gr.skip(), gr.skip(), gr.skip()
    rows = jobs.list_all_jobs()
    followed = None
    if str(job_id or "").strip():
        try:
            followed = jobs.any_job_status(job_id)
        except UserError:   # half typed, or a job of another store: nothing to follow yet
            followed = None
    running = sum(r["status"] in jobs.ACTIVE for r in rows)
    return jobs_frame(rows), f"{len(rows)} recent job(s), {running} running.", follow_text(followed)


def create_jobs_tab(page: Page) -> dict:
    token = page.token
    locked = gr.Markdown("🔒 Sign in as an **admin** to see and run jobs.", elem_classes=["emo-locked"])
    with gr.Column(visible=False, elem_id="jobs-panel") as panel:
        gr.Markdown("Long jobs run in their own processes: leave or reload the page, they go on. "
                    "Every kind is listed here: imports, Gemini runs and exports from the Data tab, "
                    "evaluations, comparison tables and fine-tunes (ft-N) from the Fine-tune tab.")
        with gr.Accordion("Start an import", open=True):
            with gr.Row(equal_height=True):
                fmt = gr.Dropdown(list(FORMATS), value="folder", label="Format", scale=1)
                path = gr.Textbox(label="Path on the server (inside the import folders)", scale=3,
                                  elem_id="jobs-import-path")
                name = gr.Textbox(label="Dataset name", scale=1, placeholder="default: the folder name",
                                  elem_id="jobs-import-name")
                start_btn = gr.Button("Start import", variant="primary", scale=0, min_width=130,
                                      elem_id="jobs-start-import")
        with gr.Row(equal_height=True):
            # No minimum: an empty box (after a reload) must not fail every timer tick.
            job = gr.Textbox(label="Job", placeholder="12, or ft-3", scale=0, min_width=120,
                             elem_id="jobs-job")
            follow_btn = gr.Button("Follow", scale=0, min_width=100)
            cancel_btn = gr.Button("Cancel", variant="stop", scale=0, min_width=100)
            refresh_btn = gr.Button("Refresh", scale=0, min_width=100)
        followed = gr.Markdown(follow_text(None), elem_id="jobs-followed")
        summary = gr.Markdown(elem_id="jobs-summary")
        table = gr.Dataframe(headers=JOB_COLUMNS, label="Recent jobs", interactive=False, wrap=True,
                             elem_id="jobs-table")
        details = gr.JSON(visible=False)
    timer = gr.Timer(POLL_SECONDS, active=False)

    private = {"api_visibility": "private"}
    start_btn.click(start_import_job, inputs=[token, fmt, path, name], outputs=job,
                    api_name="start_import_job")
    follow = dict(fn=poll, inputs=[token, job], outputs=[table, summary, followed], **private)
    job.change(**follow)
    follow_btn.click(**follow)
    refresh_btn.click(**follow)
    timer.tick(**follow, show_progress="hidden")
    cancel_btn.click(cancel_job, inputs=[token, job], outputs=details, api_name="cancel_job").then(**follow)
    # API-only endpoints: buttons no one sees (the table and the followed job show the same).
    status_btn = gr.Button(visible=False)
    status_btn.click(job_status, inputs=[token, job], outputs=details, api_name="job_status")
    list_btn = gr.Button(visible=False)
    list_btn.click(list_jobs, inputs=token, outputs=[table, summary], api_name="list_jobs")
    return {"on_access": (lambda t: poll(t, None), [table, summary, followed]),
            "gates": [(locked, "admin", "locked"), (panel, "admin", "content"),
                      (timer, "admin", "timer")]}
