"""Long jobs other than fine-tuning: import, Gemini generation, evaluation, export, and the
comparison table of several versions (annotation/table.py).

    python -m annotation.jobs start import '{"fmt": "folder", "path": "/data/faces", "name": "faces"}'
    python -m annotation.jobs start table '{"versions": ["prior-only", "v3"], "datasets": ["rafdb"]}'
    python -m annotation.jobs status 3 [--json]
    python -m annotation.jobs cancel 3
    python -m annotation.jobs list          # fine-tune jobs too (kind "finetune", id ft-N)

    from annotation.jobs import start_job, job_status, cancel_job
    job = start_job("import", {"fmt": "folder", "path": "/data/faces"})   # returns at once
    job_status(job)   # {"status": "running", "done": 120, "total": 400, "result": None, ...}

A job is a `Job` row plus a folder `<data dir>/runner/<id>/` holding `events.jsonl` (one JSON
object per line: {"event": "start"}, {"event": "progress", "done": n, "total": m},
{"event": "done", "result": {...}} | {"event": "error", "message": ...} |
{"event": "cancelled"}) and `process.log` (the subprocess's stdout/stderr). `start_job` spawns
`python -m annotation.jobs run ID` in its own session and returns; the web process only reads
the row and the log, so a reload or a restart finds the job where it is, and no model is ever
loaded in the web process for an evaluation. Shaped after LLaMA-Factory's Runner, and after
annotation/finetune.py, whose log helpers it reuses.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from annotation.finetune import _alive as _process_alive, _parse, _recent_events
from core.errors import UserError
from db.models import Job
from db.session import data_dir, session_scope

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("import", "generate", "evaluate", "export", "table")
ACTIVE = ("queued", "running")
FINAL = {"done": "done", "error": "failed", "cancelled": "cancelled"}
QUEUED_GRACE_S = 120           # a queued job with no process after this long never started
SETTLE_GRACE_S = 2.0           # how long a job that looks gone unfinished is looked at again
PROGRESS_EVERY_S = 0.25        # progress lines at most this often (a 400k import stays small)
ARGS = {"import": {"fmt", "path", "name", "fold", "label_set", "min_submitted", "split", "aligned",
                   "confined"},
        "generate": {"dataset", "limit", "model", "retry_rejected", "frames"},
        "evaluate": {"version", "dataset", "split", "num_frames"},
        "export": {"dataset", "out", "include_suggestions"},
        "table": {"versions", "datasets", "split", "out", "num_frames"}}
REQUIRED = {"import": ("fmt", "path"), "generate": ("dataset",), "evaluate": ("version", "dataset"),
            "export": ("dataset",), "table": ("versions", "datasets")}
# Jobs that must not run twice at once: two Gemini runs over one dataset would pay for the same
# records twice; evaluations (a table is several) each load a model on the one device.
EXCLUSIVE = {"generate": ("generate",), "evaluate": ("evaluate", "table"),
             "table": ("evaluate", "table")}
_start_lock = threading.Lock()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def job_dir(job_id: int) -> Path:
    # Not <data dir>/jobs/<id>: fine-tune jobs own those folders, with their own id sequence.
    path = data_dir() / "runner" / str(job_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_args(kind: str, args: dict | None) -> dict:
    if kind not in KINDS:
        raise UserError(f"unknown job kind {kind!r}: choose one of {', '.join(KINDS)}")
    args = {k: v for k, v in (args or {}).items() if v is not None}
    unknown = sorted(set(args) - ARGS[kind])
    if unknown:
        raise UserError(f"unknown {kind} job arguments: {', '.join(unknown)}")
    missing = [k for k in REQUIRED[kind] if not args.get(k)]
    if missing:
        raise UserError(f"a {kind} job needs {', '.join(missing)}")
    return args


def _busy(kind: str, args: dict, url: str | None) -> None:
    """Refuse a job that would run beside one it must not run beside (EXCLUSIVE)."""
    others = EXCLUSIVE.get(kind)
    if not others:
        return
    with session_scope(url) as s:
        active = list(s.scalars(select(Job).where(Job.kind.in_(others), Job.status.in_(ACTIVE))))
        for job in active:
            if kind == "generate" and (job.args or {}).get("dataset") != args["dataset"]:
                continue
            what = "a Gemini run over this dataset" if kind == "generate" else "an evaluation"
            raise UserError(f"{what} is already running (job {job.id}); follow it in the Jobs tab "
                            f"or cancel it first")


# ====================================================================== starting

def start_job(kind: str, args: dict | None = None, url: str | None = None) -> int:
    """Create a job row and start its subprocess; returns the job id at once."""
    args = _check_args(kind, args)
    recover_jobs(url)
    with _start_lock:   # the check and the new row together (one web process starts most jobs)
        _busy(kind, args, url)
        with session_scope(url) as s:
            job = Job(kind=kind, args=args, status="queued")
            s.add(job)
            s.flush()
            job_id = job.id
            job.log_path = str(job_dir(job_id) / "events.jsonl")
    env = dict(os.environ)
    if url:
        env["EMO_DB_URL"] = url
    env["EMO_DATA_DIR"] = str(data_dir())
    try:
        with open(job_dir(job_id) / "process.log", "ab") as out:
            # Its own session: a Ctrl-C in the app's terminal, or the app restarting, leaves it be.
            process = subprocess.Popen([sys.executable, "-m", "annotation.jobs", "run", str(job_id)],
                                       cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    except OSError as exc:
        _finish(job_id, "failed", url, error=f"cannot start the job process: {exc}")
        raise UserError(f"cannot start the job process: {exc}") from None
    with session_scope(url) as s:
        # Conditional updates: the child may have marked itself running, or even finished,
        # already; a read-modify-write here would put a finished job back to "running".
        s.execute(update(Job).where(Job.id == job_id).values(pid=process.pid))
        s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                  .values(status="running", started_at=_now()))
    return job_id


def _finish(job_id: int, status: str, url: str | None, result: dict | None = None,
            error: str | None = None) -> None:
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        job.status, job.error, job.finished_at = status, error, _now()
        if result is not None:
            job.result = result


# ====================================================================== following

def _alive(pid: int | None) -> bool:
    """Is `pid` a live job process (not a zombie, not another program that got the pid later)?"""
    return _process_alive(pid, marker=b"annotation.jobs")


def read_events(job_id: int, since: int = 0, url: str | None = None) -> list[dict]:
    """The job's JSONL events from line `since` on."""
    path = job_dir(job_id) / "events.jsonl"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return _parse(f.read().splitlines()[since:])


def _last_error(job_id: int) -> str | None:
    path = job_dir(job_id) / "process.log"
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()[-50:]):
        if line.startswith("error: ") or (line and not line[0].isspace() and
                                          ("Error" in line.split(":")[0] or "Exception" in line.split(":")[0])):
            return line[:300]
    return None


def _settled(job: Job, final: dict | None) -> tuple[str, dict | None, str | None]:
    """(status, result, error) of a job whose process is gone, from its last event."""
    if final is None:
        return "failed", job.result, (f"the job process ended without finishing "
                                      f"({_last_error(job.id) or 'killed?'})")
    if final["event"] == "done":
        return "done", final.get("result"), None
    if final["event"] == "cancelled":
        return "cancelled", job.result, None
    return "failed", job.result, final.get("message")


def _effective(job: Job, url: str | None = None) -> tuple[str, dict | None, str | None]:
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)
    if job.status in ACTIVE and not _alive(job.pid) and (
            job.status == "running" or job.pid or (_now() - created).total_seconds() > QUEUED_GRACE_S):
        # The log is read only now, after the process is known gone: read before, it could miss
        # the final line the process wrote (and committed to the row) just before it exited.
        events = _recent_events(job_dir(job.id) / "events.jsonl")
        final = next((e for e in reversed(events) if e.get("event") in FINAL), None)
        deadline = time.monotonic() + SETTLE_GRACE_S
        while final is None and time.monotonic() < deadline:
            # Seen under load in the web server (twice in this container): a job that went on to
            # finish looked gone with no final line. Before calling it failed, look again for a
            # moment: the row settled, the final line written, or the process there after all.
            time.sleep(0.25)
            with session_scope(url) as fresh:
                row = fresh.get(Job, job.id)
                if row is not None and row.status not in ACTIVE:
                    return row.status, row.result, row.error
            events = _recent_events(job_dir(job.id) / "events.jsonl")
            final = next((e for e in reversed(events) if e.get("event") in FINAL), None)
            if final is None and _alive(job.pid):
                return job.status, job.result, job.error
        return _settled(job, final)
    return job.status, job.result, job.error


def job_status(job_id: int, url: str | None = None) -> dict:
    """The job as its row and its log say; reads only (a job whose process died shows as it
    ended: settled from its log; `recover_jobs` writes that down).

    Returns dict(id, kind, args, status, done, total, result, error, pid, log_path,
    created_at, started_at, finished_at).
    """
    events = _recent_events(job_dir(job_id) / "events.jsonl")
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        status, result, error = _effective(job, url)
        progress = next((e for e in reversed(events) if e.get("event") == "progress"), {})
        stamp = lambda t: None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()
        return {"id": job.id, "kind": job.kind, "args": job.args or {}, "status": status,
                "done": progress.get("done", 0), "total": progress.get("total"),
                "stage": progress.get("stage"), "result": result, "error": error, "pid": job.pid,
                "log_path": job.log_path, "created_at": stamp(job.created_at),
                "started_at": stamp(job.started_at), "finished_at": stamp(job.finished_at)}


def list_jobs(limit: int = 50, url: str | None = None) -> list[dict]:
    """The newest jobs first, as job_status gives them."""
    with session_scope(url) as s:
        ids = list(s.scalars(select(Job.id).order_by(Job.id.desc()).limit(limit)))
    return [job_status(i, url) for i in ids]


def latest_job(kind: str, url: str | None = None) -> dict | None:
    """The newest job of a kind (what a tab shows again after a reload), or None."""
    with session_scope(url) as s:
        job_id = s.scalar(select(Job.id).where(Job.kind == kind).order_by(Job.id.desc()).limit(1))
    return None if job_id is None else job_status(job_id, url)


# Fine-tune jobs (annotation/finetune.py, table finetune_jobs) have their own id sequence: in the
# one list of every job they are "ft-<id>", and their own module follows and cancels them.
FINETUNE_PREFIX = "ft-"


def parse_job_ref(ref: str | int | float | None) -> tuple[str, int]:
    """("job", 12) for "12" or 12, ("finetune", 7) for "ft-7"; a UserError for anything else."""
    text = str(ref if ref is not None else "").strip().lower()
    kind = "finetune" if text.startswith(FINETUNE_PREFIX) else "job"
    number = text[len(FINETUNE_PREFIX):] if kind == "finetune" else text
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value.is_integer() or value < 1:
        raise UserError("Enter a job number (e.g. 12, or ft-3 for a fine-tune).")
    return kind, int(value)


def finetune_as_job(status: dict) -> dict:
    """A fine-tune job's status (annotation.finetune.job_status) in the shape job_status gives:
    kind "finetune", ref "ft-<id>", progress = step/total steps."""
    return {"id": status["id"], "ref": f"{FINETUNE_PREFIX}{status['id']}", "kind": "finetune",
            "args": {"snapshot": status.get("snapshot_id")}, "status": status["status"],
            "done": status.get("step") or 0, "total": status.get("total_steps"), "stage": "train",
            "result": ({"version": status.get("version"), "published": status.get("published"),
                        "metrics": status.get("metrics") or {}} if status.get("version") else None),
            "error": status.get("error"), "pid": status.get("pid"), "log_path": status.get("log_path"),
            "created_at": status.get("created_at"), "started_at": None, "finished_at": None}


def any_job_status(ref: str | int, url: str | None = None) -> dict:
    """job_status of "12", or of fine-tune "ft-7" (as finetune_as_job)."""
    kind, number = parse_job_ref(ref)
    if kind == "job":
        return {**job_status(number, url), "ref": str(number)}
    from annotation import finetune
    from db.models import FinetuneJob

    with session_scope(url) as s:
        if s.get(FinetuneJob, number) is None:   # finetune.job_status assumes the row exists
            raise UserError(f"no fine-tune job {number}")
    return finetune_as_job(finetune.job_status(number, url))


def cancel_any_job(ref: str | int, url: str | None = None) -> dict:
    """cancel_job of "12"; "ft-7" through annotation/finetune.py's own cancel (the trainer saves
    a partial checkpoint first)."""
    kind, number = parse_job_ref(ref)
    if kind == "job":
        return {**cancel_job(number, url), "ref": str(number)}
    from annotation import finetune

    return finetune_as_job(finetune.cancel_job(number, url))


def list_all_jobs(limit: int = 50, url: str | None = None) -> list[dict]:
    """Every kind of job, fine-tunes included, newest first (by creation time)."""
    from annotation import finetune

    rows = [{**r, "ref": str(r["id"])} for r in list_jobs(limit, url)]
    rows += [finetune_as_job(r) for r in finetune.list_jobs(url, limit=limit)]
    rows.sort(key=lambda r: r["created_at"] or "", reverse=True)
    return rows[:limit]


def recover_jobs(url: str | None = None) -> list[dict]:
    """On app start (and before a new job): settle every queued/running job whose process is
    gone, from its log, so that nothing waits on a dead job."""
    settled = []
    with session_scope(url) as s:
        for job in s.scalars(select(Job).where(Job.status.in_(ACTIVE))):
            status, result, error = _effective(job, url)
            if status not in ACTIVE:
                job.status, job.result, job.error = status, result, error
                job.finished_at = job.finished_at or _now()
                settled.append(job.id)
    return [job_status(i, url) for i in settled]


def wait_for_job(job_id: int, url: str | None = None, timeout_s: float | None = None,
                 poll_s: float = 0.5, on_progress=None) -> dict:
    """Block until the job ends (the web handlers that still answer with the result use it);
    `on_progress(status)` after each poll."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_status(job_id, url)
        if status["status"] not in ACTIVE:
            return status
        if on_progress is not None:
            on_progress(status)
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"job {job_id} is still {status['status']} after {timeout_s:.0f} s")
        time.sleep(poll_s)


# ====================================================================== stopping

def cancel_job(job_id: int, url: str | None = None) -> dict:
    """A clean stop: SIGTERM, on which the job logs 'cancelled' and exits (an import commits
    in batches, so what it stored stays and a rerun adds only the rest)."""
    status = job_status(job_id, url)
    if status["status"] not in ACTIVE:
        raise UserError(f"job {job_id} is {status['status']}, not running")
    if _alive(status["pid"]):
        os.kill(status["pid"], signal.SIGTERM)
        for _ in range(100):   # the runner's handler is quick; the row says so once it has run
            if job_status(job_id, url)["status"] not in ACTIVE:
                break
            time.sleep(0.1)
    else:
        _finish(job_id, "cancelled", url)
    return job_status(job_id, url)


# ====================================================================== the job process

class _Cancelled(BaseException):
    """Raised by the SIGTERM handler; a BaseException so that no `except Exception` eats it."""


class _Log:
    def __init__(self, job_id: int):
        self.job_id = job_id
        self.path = job_dir(job_id) / "events.jsonl"
        self.last = 0.0
        self.lock = threading.Lock()   # generation reports from worker threads

    def write(self, event: dict) -> None:
        line = json.dumps({**event, "at": _now().isoformat()}, ensure_ascii=False, default=str)
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def progress(self, done: int, total: int | None, stage: str | None = None,
                 force: bool = False) -> None:
        now = time.monotonic()
        if force or done == total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.write({"event": "progress", "done": int(done), "total": total, "stage": stage})


def _track_tqdm(log: _Log) -> None:
    """The importer reports progress through tqdm bars; in this process, every bar also writes
    progress events (the way gr.Progress(track_tqdm=True) follows them)."""
    import tqdm as tqdm_module

    base = tqdm_module.tqdm

    class Tracked(base):
        def update(self, n=1):
            shown = super().update(n)
            log.progress(self.n, self.total, getattr(self, "desc", None))
            return shown

    tqdm_module.tqdm = Tracked


def _run_import(args: dict, url: str | None, log: _Log) -> dict:
    from annotation.ingest import import_dataset

    _track_tqdm(log)
    # progress=True only enables the bars (written to process.log), which feed the events.
    return import_dataset(args["fmt"], args["path"], args.get("name"), url=url, progress=True,
                          fold=args.get("fold", 1), label_set=args.get("label_set"),
                          min_submitted=args.get("min_submitted"), split=args.get("split"),
                          aligned=args.get("aligned"), confined=bool(args.get("confined"))).to_dict()


def _run_generate(args: dict, url: str | None, log: _Log) -> dict:
    from annotation.gemini import run_generation

    return run_generation(args["dataset"], limit=args.get("limit"), model=args.get("model"),
                          retry_rejected=bool(args.get("retry_rejected")),
                          frames=int(args.get("frames", 1)), url=url,
                          progress=lambda done, total, summary: log.progress(done, total, "gemini"))


def _run_evaluate(args: dict, url: str | None, log: _Log) -> dict:
    from annotation.evaluate import evaluate_version

    return evaluate_version(args["version"], args["dataset"], args.get("split", "test"), url=url,
                            num_frames=args.get("num_frames"),
                            progress=lambda done, total: log.progress(done, total, "evaluate"))


def _run_table(args: dict, url: str | None, log: _Log) -> dict:
    from annotation.table import compare_versions

    # Its files go to the job's own folder unless the job names one.
    return compare_versions(args["versions"], args["datasets"], args.get("split", "test"), url=url,
                            out=args.get("out") or job_dir(log.job_id) / "table",
                            num_frames=args.get("num_frames"),
                            # A cell is seconds to hours: every one is worth a line.
                            progress=lambda done, total, stage: log.progress(done, total, stage,
                                                                             force=True))


def _run_export(args: dict, url: str | None, log: _Log) -> dict:
    from annotation.export import export_dataset

    return export_dataset(args["dataset"], args.get("out"), url=url,
                          include_suggestions=bool(args.get("include_suggestions"))).to_dict()


RUNNERS = {"import": _run_import, "generate": _run_generate, "evaluate": _run_evaluate,
           "export": _run_export, "table": _run_table}


def run(job_id: int, url: str | None = None) -> int:
    """The job process: run the job, logging progress; exit 0 done, 1 failed, 3 cancelled."""
    def stop(signum, frame):
        raise _Cancelled()

    signal.signal(signal.SIGTERM, stop)
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        if job.status not in ACTIVE:   # cancelled before its process got going
            return 3
        kind, args = job.kind, dict(job.args or {})
        job.status, job.started_at = "running", job.started_at or _now()
        job.pid = job.pid or os.getpid()
    log = _Log(job_id)
    log.write({"event": "start", "kind": kind})
    try:
        result = json.loads(json.dumps(RUNNERS[kind](args, url, log), default=str))
    except _Cancelled:
        log.write({"event": "cancelled"})
        _finish(job_id, "cancelled", url)
        return 3
    except UserError as exc:
        log.write({"event": "error", "message": str(exc)})
        _finish(job_id, "failed", url, error=str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - the log and the row say what broke, then re-raise
        message = f"{type(exc).__name__}: {exc}"[:500]
        log.write({"event": "error", "message": message})
        _finish(job_id, "failed", url, error=message)
        raise
    log.write({"event": "done", "result": result})
    _finish(job_id, "done", url, result=result)
    return 0


def _format(status: dict) -> str:
    total = f"/{status['total']}" if status["total"] else ""
    line = (f"job {status.get('ref', status['id'])} ({status['kind']}): {status['status']}, "
            f"{status['done']}{total}")
    if status["error"]:
        line += f"\n  error: {status['error']}"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation.jobs", description=__doc__.split("\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="run a job in this process (what start_job spawns)")
    p.add_argument("job_id", type=int)
    p = actions.add_parser("start", help="start a job in the background")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("args", nargs="?", default="{}", help="the job's arguments as a JSON object")
    p.add_argument("--wait", action="store_true", help="wait for the job to end")
    p.add_argument("--json", action="store_true")
    for name in ("status", "cancel"):
        p = actions.add_parser(name)
        p.add_argument("job_id", help="a job number, or ft-N for fine-tune job N")
        p.add_argument("--json", action="store_true")
    p = actions.add_parser("list")
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from db.session import init_db

    try:
        if args.action == "run":
            return run(args.job_id)
        init_db()
        if args.action == "start":
            try:
                job_args = json.loads(args.args)
            except json.JSONDecodeError as exc:
                raise UserError(f"the job arguments are not JSON: {exc}") from None
            if not isinstance(job_args, dict):
                raise UserError("the job arguments must be a JSON object")
            job_id = start_job(args.kind, job_args)
            result: Any = wait_for_job(job_id) if args.wait else job_status(job_id)
        elif args.action == "status":
            recover_jobs()
            result = any_job_status(args.job_id)
        elif args.action == "cancel":
            result = cancel_any_job(args.job_id)
        else:
            result = list_all_jobs()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        rows = result if isinstance(result, list) else [result]
        print("\n".join(_format(r) for r in rows) or "no jobs yet")
    if isinstance(result, dict) and result.get("status") == "failed":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
