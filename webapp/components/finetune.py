"""The Fine-tune tab (admin): start a job from a snapshot, follow it, evaluate, publish, roll back.

A job runs as a subprocess that appends JSONL events to its log (annotation/finetune.py); this
tab follows that log with a gr.Timer, so closing or reloading the page loses nothing: the job's
state lives in the database and the log, and the page picks the latest job up again. A job that
passes its evaluation gate publishes itself; the buttons here publish or roll back by hand.

Evaluate and Compare versions start jobs too (kinds "evaluate" and "table", annotation/jobs.py):
the button returns at once with the job's number, the timer follows it, and the report (or the
table's Markdown) is drawn from the job's stored result when it is done, after a reload too.

    Client(url).predict(token, ["prior-only", "v3"], ["rafdb"], "test", api_name="/start_compare_versions")
"""
from __future__ import annotations

import html
import threading

import gradio as gr
import pandas as pd

from core.errors import UserError
from webapp.auth import require
from webapp.components.common import Page, engine, handle_errors, server_choices
from webapp.components.render import mode_banner

POLL_SECONDS = 2.0
LOG_LINES = 40
EVALUATE_GROUP = "evaluate"
SERVING_DEFAULT = ("(the serving version)", "")
# The embedded default (no checkpoint: the face prior network) can be measured like a version,
# through the engine, but it is not one: it cannot be published or rolled back to.
PRIOR_ONLY = "prior-only"
PRIOR_ONLY_CHOICE = ("prior-only (the embedded default, no checkpoint)", PRIOR_ONLY)
TERMINAL = ("succeeded", "failed", "cancelled")
TERMINAL_JOB = ("done", "failed", "cancelled")   # annotation/jobs.py's ends


def _finetune():
    import annotation.finetune as finetune

    return finetune


# Events read so far per job: each poll asks the log only for the lines that are new.
_events: dict[int, list[dict]] = {}
_events_lock = threading.Lock()


def job_events(job_id: int) -> list[dict]:
    with _events_lock:
        seen = _events.setdefault(job_id, [])
        seen.extend(_finetune().read_events(job_id, since=len(seen)))
        return list(seen)


# ------------------------------------------------------------------------- choices and tables

def snapshot_choices() -> list[tuple[str, int]]:
    from sqlalchemy import select

    from db.models import Dataset, ExportSnapshot
    from db.session import session_scope

    with session_scope() as session:
        rows = session.execute(select(ExportSnapshot, Dataset.name)
                               .join(Dataset, Dataset.id == ExportSnapshot.dataset_id)
                               .order_by(ExportSnapshot.id.desc())).all()
        return [(f"#{snap.id} · {name} · {snap.n_samples} samples · "
                 f"{snap.created_at:%Y-%m-%d %H:%M}", snap.id) for snap, name in rows]


def evaluation_choices(names: list[str]) -> list[tuple[str, str]]:
    """What the Version dropdown offers: every version, then the embedded default."""
    return [(n, n) for n in names] + [PRIOR_ONLY_CHOICE]


def _not_prior_only(version: str, action: str) -> None:
    if version.strip().lower() == PRIOR_ONLY:
        raise UserError(f"prior-only is the embedded default, not a model version: it can be "
                        f"evaluated, not {action}.")


def versions() -> list[dict]:
    from annotation.versions import list_versions

    return list_versions()


def _uar_text(metrics: dict | None) -> str:
    """'0.512 (faces/test)' for each dataset/split the version was evaluated on."""
    return "; ".join(f"{m['uar']:.3f} ({key})" for key, m in (metrics or {}).items()
                     if isinstance(m, dict) and isinstance(m.get("uar"), (int, float)))


VERSION_COLUMNS = ["name", "parent", "UAR (dataset/split)", "published", "serving", "created"]


def versions_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[v["name"], v.get("parent") or "", _uar_text(v.get("metrics")),
                          "yes" if v.get("published") else "",
                          "● serving" if v.get("is_serving") else "",
                          (v.get("created_at") or "")[:16].replace("T", " ")] for v in rows],
                        columns=VERSION_COLUMNS)


def serving_text(rows: list[dict]) -> str:
    serving = next((v for v in rows if v.get("is_serving")), None)
    if serving is None:
        return ("No fine-tuned version is serving yet: the engine runs the model it started with "
                "(EMO_LLAMA_MODEL / --model).")
    uar = _uar_text(serving.get("metrics"))
    text = f"Serving **{html.escape(serving['name'])}**" + (f", UAR {uar}." if uar else ".")
    # The registry says what should serve; the engine says what answers (a failed or pending load).
    answering = str(engine().info["model_version"])
    if answering.split(":")[-1] != serving["name"]:
        text += (f" The engine still answers with **{html.escape(answering)}**: it follows the "
                 "registry within seconds; if this stays, the version failed to load (server log).")
    return text


def progress_html(status: dict, events: list[dict]) -> str:
    """A progress bar and status lines, built from numbers and escaped text only."""
    step, total = int(status.get("step") or 0), int(status.get("total_steps") or 0)
    state = str(status.get("status") or "unknown")
    parts = [f"<b>{html.escape(state)}</b>", f"step {step}/{total or '?'}"]
    if isinstance(status.get("loss"), (int, float)):
        parts.append(f"loss {status['loss']:.4f}")
    if isinstance(status.get("eta_s"), (int, float)) and state == "running":
        parts.append(f"ETA {int(status['eta_s'])} s")
    lines = [" · ".join(parts)]
    evaluation = next((e for e in reversed(events) if e.get("event") == "eval"), None)
    if evaluation:
        lines.append(f"Evaluation of {html.escape(str(evaluation.get('version')))}: UAR "
                     f"{evaluation['uar']:.3f} (parent {evaluation['parent_uar']:.3f}), WAR "
                     f"{evaluation['war']:.3f}")
    done = next((e for e in reversed(events) if e.get("event") == "done"), None)
    if done:
        verdict = "published and serving" if done.get("published") else "not published"
        lines.append(f"Version {html.escape(str(done.get('version')))}: {verdict} — "
                     f"{html.escape(str(done.get('gate') or ''))}")
    if status.get("error"):
        lines.append(f"<span class='emo-conflict'>{html.escape(str(status['error']))}</span>")
    bar = (f"<progress class='emo-progress' max='{max(total, 1)}' value='{step}' "
           f"data-step='{step}' data-total='{total}' data-status='{html.escape(state)}'>"
           "</progress>")
    return (f"<div id='finetune-progress-box'>{bar}"
            + "".join(f"<div>{line}</div>" for line in lines) + "</div>")


def loss_frame(events: list[dict]) -> pd.DataFrame:
    from annotation.finetune import loss_curve

    curve = loss_curve(events)  # one point per step: a resumed job logs its repeats again
    return pd.DataFrame({"step": [step for step, _ in curve], "loss": [loss for _, loss in curve]})


def log_text(events: list[dict]) -> str:
    lines = []
    for e in events[-LOG_LINES:]:
        fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "time", "options"))
        lines.append(f"{e.get('event', '?'):>10}  {fields}")
    return "\n".join(lines)


def _confusion(path: str | None):
    """The confusion-matrix PNG as pixels (the app serves no files from the reports folder)."""
    from pathlib import Path

    if not path or not Path(path).is_file():   # a report whose picture was cleaned up since
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()


# ------------------------------------------------------------------------- handlers

@handle_errors
def start(token: str | None, snapshot: int | None, from_version: str | None, epochs: float,
          lr: float, replay_ratio: float):
    """/start_finetune: launch a job from an export snapshot; the job list, on it (admin)."""
    require(token, "admin")
    if snapshot in (None, ""):
        raise UserError("Choose an export snapshot to train on (the Data tab makes one).")
    options = {"epochs": int(epochs), "lr": float(lr), "replay_ratio": float(replay_ratio)}
    job_id = _finetune().start_job(int(snapshot), from_version or None, options)
    gr.Info(f"Fine-tune job {job_id} started.")
    return gr.update(choices=job_choices(), value=job_id)


def job_choices() -> list[tuple[str, int]]:
    return [(f"job {job['id']} · {job['status']} · {job['created_at'][:16].replace('T', ' ')}",
             int(job["id"])) for job in _finetune().list_jobs()]


@handle_errors
def poll(token: str | None, job_id: int | None, seen: list | None):
    """One tick of the monitor: progress, loss curve, log tail, the job's confusion matrix.

    `seen` is the [job, status] this page last showed. A finished job that is already on
    screen sends nothing. The confusion matrix is sent only when that pair changes: between
    ticks the Evaluate button may be showing another version's matrix in the same place. When
    the job has just finished, the job list, the versions and the model banner are refreshed
    too: the job may have published a version.
    """
    require(token, "admin")
    unchanged = (gr.skip(),) * 6
    if job_id in (None, ""):
        return ("<div id='finetune-progress-box'>No job yet: start one on the left.</div>",
                loss_frame([]), "", gr.skip(), None, *unchanged)
    status = _finetune().job_status(int(job_id))  # also settles a job whose process died
    now = [int(job_id), status["status"]]
    if now == seen and status["status"] in TERMINAL:
        return (gr.skip(),) * 11
    events = job_events(int(job_id))
    evaluation = next((e for e in reversed(events) if e.get("event") == "eval"), None)
    changed = now != seen
    shown = (progress_html(status, events), loss_frame(events), log_text(events),
             _confusion(evaluation.get("confusion_png")) if evaluation and changed else gr.skip(),
             now)
    if not changed or status["status"] not in TERMINAL:
        return (*shown, *unchanged)
    jobs, rows = job_choices(), versions()
    names = [v["name"] for v in rows]
    return (*shown, gr.update(choices=jobs),
            gr.update(choices=[SERVING_DEFAULT] + [(n, n) for n in names]),
            gr.update(choices=evaluation_choices(names),
                      **({"value": status["version"]} if status.get("version") else {})),
            versions_frame(rows), serving_text(rows), mode_banner(engine().info))


@handle_errors
def cancel(token: str | None, job_id: int | None) -> None:
    """/cancel_finetune: a clean stop; the trainer keeps a partial checkpoint (admin)."""
    require(token, "admin")
    if job_id in (None, ""):
        raise UserError("Choose a job to cancel.")
    _finetune().cancel_job(int(job_id))
    gr.Info(f"Asked job {job_id} to stop; it saves a partial checkpoint first.")


@handle_errors
def refresh(token: str | None):
    """Jobs (the latest selected), snapshots, versions and what is serving."""
    require(token, "admin")
    jobs, rows = job_choices(), versions()
    names = [v["name"] for v in rows]
    return (gr.update(choices=jobs, value=jobs[0][1] if jobs else None),
            gr.update(choices=snapshot_choices()),
            gr.update(choices=[SERVING_DEFAULT] + [(n, n) for n in names]),
            gr.update(choices=evaluation_choices(names), value=names[-1] if names else PRIOR_ONLY),
            versions_frame(rows), serving_text(rows), gr.update(choices=evaluation_choices(names)))


def refresh_quietly(token: str | None):
    """`refresh` for whoever may see the tab; nothing at all for anybody else."""
    try:
        require(token, "admin")
    except UserError:
        return tuple(gr.skip() for _ in range(7))
    return refresh(token)


def on_access(token: str | None):
    """Sign-in, load, tab opening: the tables and choices, and the latest evaluation and
    comparison followed again (a reload finds them running or shows their result)."""
    return (*refresh_quietly(token), *restore_jobs(token))


def _evaluate_args(version: str | None, dataset: str | None, split: str) -> dict:
    if not version or not dataset:
        raise UserError("Choose a version and a dataset to evaluate on.")
    return {"version": version, "dataset": dataset, "split": split}


@handle_errors
def start_evaluate(token: str | None, version: str | None, dataset: str | None, split: str):
    """/start_evaluate_version: start an evaluation job (admin); its number at once, and the
    status line. The report appears when it is done (or ask /job_status)."""
    require(token, "admin")
    from annotation import jobs
    from webapp.components.jobs import job_line

    # A job process loads the model and scores; this process only follows its log (no second
    # model beside the engine's), and the job stays listed in the Jobs tab across a reload.
    job_id = jobs.start_job("evaluate", _evaluate_args(version, dataset, split))
    return job_id, job_line(jobs.job_status(job_id), "evaluation")


def _names(value, what: str) -> list[str]:
    names = [str(x).strip() for x in ([value] if isinstance(value, str) else value or [])
             if str(x).strip()]
    if not names:
        raise UserError(f"Choose at least one {what}.")
    return names


@handle_errors
def start_compare(token: str | None, chosen: list[str] | None, datasets: list[str] | None,
                  split: str):
    """/start_compare_versions: the comparison table (UAR/WAR per dataset, best in bold) of
    the chosen versions as a job (admin); its number at once. prior-only, version names,
    checkpoint folders and zero-shot:ID specs all count as versions."""
    require(token, "admin")
    from annotation import jobs
    from webapp.components.jobs import job_line

    job_id = jobs.start_job("table", {"versions": _names(chosen, "version"),
                                      "datasets": _names(datasets, "dataset"), "split": split})
    return job_id, job_line(jobs.job_status(job_id), "comparison"), ""


def poll_jobs(token: str | None, eval_job: int | None, table_job: int | None, seen: dict | None):
    """The timer for the Evaluate and Compare jobs: their status lines, and their report or
    table once, when done (drawn from the job's stored result); quiet for non-admins."""
    from webapp.components.jobs import follow_state, job_line

    try:
        require(token, "admin")
    except UserError:
        return (gr.skip(),) * 8
    seen, out = dict(seen or {}), []
    for kind, job_id, n in (("evaluate", eval_job, 4), ("table", table_job, 1)):
        status, now, fresh = follow_state(job_id, seen.get(kind))
        if status is None or (now == seen.get(kind) and now[1] in TERMINAL_JOB):
            out += [gr.skip()] * (1 + n)
            continue
        seen[kind] = now
        out.append(job_line(status, "evaluation" if kind == "evaluate" else "comparison"))
        if not fresh:
            out += [gr.skip()] * n
        elif kind == "evaluate":
            out += list(evaluation_outputs(status["args"]["version"], status["args"]["dataset"],
                                           status["args"].get("split", "test"), status["result"]))
        else:
            out.append(status["result"]["markdown"])
    return (*out, seen)


def restore_jobs(token: str | None):
    """After a reload or sign-in: follow the latest evaluation and comparison again."""
    try:
        require(token, "admin")
    except UserError:
        return (gr.skip(),) * 3
    from webapp.components.jobs import latest_job

    return latest_job("evaluate"), latest_job("table"), {}


@handle_errors
def evaluate(token: str | None, version: str | None, dataset: str | None, split: str,
             progress=gr.Progress()):
    """/evaluate_version: UAR, WAR, per-class recall and the confusion matrix (admin); waits
    for the job (the page's button uses /start_evaluate_version).
    `version` "prior-only" measures the embedded default (the prior network, no checkpoint)."""
    require(token, "admin")
    from webapp.components.jobs import run_and_follow

    args = _evaluate_args(version, dataset, split)
    return evaluation_outputs(version, dataset, split, run_and_follow("evaluate", args, progress))


def evaluation_outputs(version: str, dataset: str, split: str, report: dict) -> tuple:
    """The summary line, the per-class recall table, the confusion matrix, the versions table."""
    recall = pd.DataFrame([[label, "" if value is None else f"{value:.3f}"]
                           for label, value in report["per_class_recall"].items()],
                          columns=["class", "recall"])
    shown = (f"{PRIOR_ONLY} (the embedded default)" if version.strip().lower() == PRIOR_ONLY
             else version)
    summary = (f"**{html.escape(shown)}** on {html.escape(dataset)}/{html.escape(split)}: UAR "
               f"**{report['uar']:.3f}** · WAR **{report['war']:.3f}** · {report['n']} samples")
    if report.get("no_face"):
        summary += (f" · no face found in {report['no_face']}"
                    + (" (no label: counted as misses)" if report.get("unanswered")
                       else " (answered from the whole frame)"))
    if isinstance(report.get("rouge_l"), (int, float)):
        summary += f" · ROUGE-L {report['rouge_l']:.3f} on {report['rouge_l_n']} explanations"
    if isinstance(report.get("ece"), (int, float)):
        summary += (f" · ECE {report['ece']:.3f} at label temperature {report['temperature']:.3g} "
                    f"(ECE {report['ece_before_temperature']:.3f} at T = 1; T "
                    f"{html.escape(str(report.get('temperature_note', '')))})")
    if report.get("skipped"):
        summary += f" · {len(report['skipped'])} skipped (unreadable or off-label)"
    rows = versions()
    return summary, recall, _confusion(report.get("confusion_png")), versions_frame(rows)


@handle_errors
def publish(token: str | None, version: str | None):
    """/publish_version: serve a version if its evaluation gate passes (admin)."""
    require(token, "admin")
    if not version:
        raise UserError("Choose a version to publish.")
    _not_prior_only(version, "published")
    from annotation.versions import publish as publish_version

    publish_version(version)
    return _serving_changed(f"{version} is published and serving.")


@handle_errors
def rollback(token: str | None, version: str | None):
    """/rollback_version: serve an earlier published version again (admin)."""
    require(token, "admin")
    if not version:
        raise UserError("Choose the version to roll back to.")
    _not_prior_only(version, "rolled back to")
    from annotation.versions import rollback as rollback_to

    rollback_to(version)
    return _serving_changed(f"Rolled back: {version} is serving.")


def _serving_changed(message: str) -> tuple:
    """Tell the admin, and refresh the versions table, the serving line and the page banner."""
    gr.Info(message)
    rows = versions()
    return versions_frame(rows), serving_text(rows), mode_banner(engine().info)


# ------------------------------------------------------------------------- layout

def create_finetune_tab(page: Page) -> dict:
    """The tab; `banner` is the page's model banner, which changes when a version is served."""
    token, banner = page.token, page.banner
    locked = gr.Markdown("🔒 Sign in as an **admin** to fine-tune, evaluate and publish model "
                         "versions.", elem_classes=["emo-locked"])
    with gr.Column(visible=False, elem_id="finetune-panel") as panel:
        serving = gr.Markdown(elem_id="finetune-serving")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                gr.Markdown("### New job")
                snapshot = server_choices("Export snapshot", elem_id="finetune-snapshot",
                                          info="Make one on the Data tab (3 · Export).")
                from_version = server_choices("Start from", value="", choices=[SERVING_DEFAULT],
                                              info="Incremental: a version's adapter is the "
                                                   "starting point.")
                with gr.Row():
                    epochs = gr.Number(label="Epochs", value=2, minimum=1, maximum=50,
                                       precision=0)
                    lr = gr.Number(label="Learning rate", value=2e-4, minimum=0)
                replay = gr.Slider(label="Replay ratio", minimum=0, maximum=1, value=0.2,
                                   step=0.05, info="Earlier samples mixed in per new sample, "
                                                   "against forgetting.")
                start_btn = gr.Button("Start fine-tune", variant="primary",
                                      elem_id="finetune-start")
            with gr.Column(scale=8):
                gr.Markdown("### Job")
                with gr.Row(equal_height=True):
                    job = server_choices("Job", elem_id="finetune-job")
                    refresh_btn = gr.Button("Refresh", scale=0, min_width=100)
                    cancel_btn = gr.Button("Cancel job", variant="stop", scale=0,
                                           min_width=120)
                progress = gr.HTML(elem_id="finetune-progress")
                curve = gr.LinePlot(x="step", y="loss", label="Training loss",
                                    elem_id="finetune-curve")
                logs = gr.Textbox(label="Log (latest events)", lines=8, max_lines=8,
                                  interactive=False, autoscroll=True)
        with gr.Accordion("Evaluate, publish, roll back", open=True):
            with gr.Row(equal_height=True):
                version = server_choices("Version", elem_id="finetune-version",
                                         choices=[PRIOR_ONLY_CHOICE], value=PRIOR_ONLY,
                                         info="prior-only measures the embedded default")
                eval_dataset = server_choices("Dataset")
                split = gr.Radio(["test", "val", "train"], value="test", label="Split")
            with gr.Row():
                eval_btn = gr.Button("Evaluate", elem_id="finetune-evaluate")
                publish_btn = gr.Button("Publish (if the gate passes)", variant="primary")
                rollback_btn = gr.Button("Roll back to this version")
            eval_line = gr.Markdown(elem_id="finetune-eval-job")
            eval_summary = gr.Markdown(elem_id="finetune-eval-summary")
            with gr.Row(equal_height=False):
                recall = gr.Dataframe(headers=["class", "recall"], label="Per-class recall",
                                      interactive=False)
                confusion = gr.Image(label="Confusion matrix", type="pil", interactive=False,
                                     height=340, elem_id="finetune-confusion")
            versions_table = gr.Dataframe(headers=VERSION_COLUMNS, label="Model versions",
                                          interactive=False, elem_id="finetune-versions")
        with gr.Accordion("Compare versions", open=False):
            gr.Markdown("The paper's kind of table: UAR / WAR per dataset, one row per version, "
                        "the best of each column in bold. Type a checkpoint folder or "
                        "`zero-shot:ID` to add it. Also `python app.py table`.")
            with gr.Row(equal_height=True):
                compare_versions = server_choices("Versions", multiselect=True,
                                                  choices=[PRIOR_ONLY_CHOICE], value=[PRIOR_ONLY],
                                                  elem_id="finetune-compare-versions")
                compare_datasets = server_choices("Datasets", multiselect=True,
                                                  elem_id="finetune-compare-datasets")
                compare_split = gr.Radio(["test", "val", "train"], value="test", label="Split")
                compare_btn = gr.Button("Compare versions", scale=0, min_width=160,
                                        elem_id="finetune-compare")
            table_line = gr.Markdown(elem_id="finetune-table-job")
            table_md = gr.Markdown(elem_id="finetune-table")
    timer = gr.Timer(POLL_SECONDS, active=False)
    seen = gr.State(None)  # the [job, status] this page last showed
    # The evaluation and comparison jobs this page follows, and what it last showed of them.
    eval_job, table_job, jobs_seen = gr.State(None), gr.State(None), gr.State(None)

    private = {"api_visibility": "private"}
    start_btn.click(start, inputs=[token, snapshot, from_version, epochs, lr, replay],
                    outputs=job, api_name="start_finetune")
    monitor = dict(fn=poll, inputs=[token, job, seen],
                   outputs=[progress, curve, logs, confusion, seen, job, from_version,
                            version, versions_table, serving, banner])
    timer.tick(**monitor, show_progress="hidden", **private)
    job.change(**monitor, **private)
    cancel_btn.click(cancel, inputs=[token, job], api_name="cancel_finetune")
    refresh_outputs = [job, snapshot, from_version, version, versions_table, serving,
                       compare_versions]
    refresh_btn.click(refresh, inputs=token, outputs=refresh_outputs, **private)
    # Evaluate and Compare start jobs and return at once; the timer follows them.
    eval_btn.click(start_evaluate, inputs=[token, version, eval_dataset, split],
                   outputs=[eval_job, eval_line], api_name="start_evaluate_version")
    compare_btn.click(start_compare, inputs=[token, compare_versions, compare_datasets, compare_split],
                      outputs=[table_job, table_line, table_md], api_name="start_compare_versions")
    timer.tick(poll_jobs, inputs=[token, eval_job, table_job, jobs_seen],
               outputs=[eval_line, eval_summary, recall, confusion, versions_table, table_line,
                        table_md, jobs_seen], show_progress="hidden", **private)
    # For scripts: the evaluation answering with its report (a button no one sees).
    evaluate_btn = gr.Button(visible=False)
    evaluate_btn.click(evaluate, inputs=[token, version, eval_dataset, split],
                       outputs=[eval_summary, recall, confusion, versions_table],
                       api_name="evaluate_version", concurrency_id=EVALUATE_GROUP,
                       concurrency_limit=1)
    publish_btn.click(publish, inputs=[token, version],
                      outputs=[versions_table, serving, banner], api_name="publish_version")
    rollback_btn.click(rollback, inputs=[token, version],
                       outputs=[versions_table, serving, banner], api_name="rollback_version")
    return {"on_access": (on_access, [*refresh_outputs, eval_job, table_job, jobs_seen]),
            "gates": [(locked, "admin", "locked"), (panel, "admin", "content"),
                      (timer, "admin", "timer"), (eval_dataset, "admin", "datasets"),
                      (compare_datasets, "admin", "datasets")]}
