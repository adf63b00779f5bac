"""Fine-tune jobs as the web app drives them: start, follow, cancel, resume, recover.

    python app.py finetune --snapshot 3 [--from-version v2] [--epochs 2] [--name v3]
    python app.py finetune --resume 7                      # continue killed job 7
    accelerate launch app.py finetune --snapshot 3         # several GPUs (docs/accelerate/*.yaml)

    from annotation.finetune import start_job, job_status, read_events, cancel_job
    job = start_job(3, options={"epochs": 2})               # returns at once
    job_status(job)   # {"status": "running", "step": 12, "total_steps": 40, "loss": ..., ...}

A job is a `FinetuneJob` row plus a folder `<data dir>/jobs/<id>/` holding `events.jsonl` (one
JSON object per line: start, step, checkpoint, eval, done | failed | cancelled), `process.log`
(the subprocess's stdout/stderr) and its checkpoints. `start_job` spawns `python app.py finetune
--job-id N` (annotation/train.py does the training) in its own session and returns; everything
after that is read back from the database and the log, so a page reload or an app restart finds
the job where it is, and a job whose process died is settled from its log (`recover_jobs`),
never left "running". One job trains at a time: this machine has one device to train on.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from core.errors import UserError
from db.models import ExportSnapshot, FinetuneJob, ModelVersion
from db.session import data_dir, session_scope

ROOT = Path(__file__).resolve().parents[1]
ACTIVE = ("queued", "running")
FINAL_EVENTS = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled"}
QUEUED_GRACE_S = 120          # a queued job with no process after this long never started
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
_thread_lock = threading.Lock()


@dataclass
class TrainOptions:
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 4           # per process, per micro-batch
    grad_accum: int = 1           # micro-batches per optimizer step
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"     # a transformers get_scheduler name
    replay_ratio: float = 0.2     # earlier training samples replayed per new sample, each epoch
    seed: int = 0
    checkpoint_every: int = 50    # optimizer steps
    max_steps: int | None = None  # overrides epochs
    num_frames: int | None = None  # frames sampled per video (None: the model's config.num_frames)
    gradient_checkpointing: bool = False
    precision: str = "auto"       # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_split: str = "test"      # the held-out split the publish gate is measured on
    gate_margin: float = 0.0      # allowed UAR drop against the parent (0: never worse)
    name: str | None = None       # the new version's name (default v<job id>, fixed at creation)
    num_workers: int = 0          # DataLoader processes preparing samples ahead (0: in the trainer)
    feature_cache: bool = True    # keep prepared samples + frozen vision features from epoch 1 on

    @classmethod
    def from_dict(cls, values: dict | None) -> "TrainOptions":
        values = {k: v for k, v in (values or {}).items() if v is not None}
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"unknown fine-tune options: {', '.join(unknown)}")
        kinds = {"int": int, "float": float, "bool": bool, "str": str}
        try:  # the web form sends floats for integer fields, JSON sends strings now and then
            typed = {k: kinds[known[k].split(" ")[0]](v) for k, v in values.items()}
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad fine-tune option value: {exc}") from None
        return cls(**typed).validate()

    def validate(self) -> "TrainOptions":
        checks = [(self.epochs >= 1, "epochs must be at least 1"),
                  (self.lr > 0, "lr must be positive"),
                  (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
                  (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
                  (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}"),
                  (self.replay_ratio >= 0, "replay_ratio must be 0 or more"),
                  (self.checkpoint_every >= 1, "checkpoint_every must be at least 1"),
                  (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
                  (self.num_frames is None or self.num_frames >= 1, "num_frames must be at least 1"),
                  (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
                  (self.eval_split in ("train", "val", "test"), "eval_split must be train, val or test"),
                  (0 <= self.num_workers <= 64, "num_workers must be 0 to 64"),
                  (self.gate_margin >= 0, "gate_margin must be 0 or more"),
                  (self.name is None or bool(VERSION_NAME.match(self.name)),
                   "a version name is 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


# ====================================================================== creating and starting

@contextmanager
def _one_at_a_time():
    """Makes "no job is active -> make one active" atomic, across threads (the web app) and
    processes (the web app and a CLI run side by side): a lock file next to the jobs."""
    from filelock import FileLock

    with _thread_lock, FileLock(data_dir() / "jobs.lock"):
        yield


def job_dir(job_id: int) -> Path:
    path = data_dir() / "jobs" / str(job_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _resolve_snapshot(snapshot: str | int, session) -> ExportSnapshot:
    ref = str(snapshot)
    if ref.isdigit():
        row = session.get(ExportSnapshot, int(ref))
    else:
        row = session.scalar(select(ExportSnapshot).where(
            (ExportSnapshot.path == str(Path(ref).resolve())) | (ExportSnapshot.content_hash == ref)))
    if row is None:
        raise UserError(f"no export snapshot {ref!r}; make one with `python app.py export`")
    if not (Path(row.path) / "instructions.jsonl").exists():
        raise UserError(f"export snapshot {row.id}: {row.path}/instructions.jsonl is missing")
    return row


def _resolve_parent(from_version: str | None, url: str | None) -> int:
    """The version a job starts from, fixed when the job is created (a resumed job must not
    silently switch parents because another version was published meanwhile)."""
    from annotation.versions import ensure_registered, find_version, serving_version

    if from_version:
        parent = find_version(from_version, url)
        if parent is None:
            raise UserError(f"no model version named {from_version!r}")
    else:
        parent = serving_version(url)
        if parent is None:
            base = os.environ.get("EMO_LLAMA_MODEL")
            if not base:
                raise UserError("nothing to fine-tune: no model version is serving and EMO_LLAMA_MODEL is "
                                "not set (EMO-LLaMA starts from LLaMA-VID: `python app.py build-model "
                                "--from-llamavid YanweiLi/llama-vid-7b-full-224-video-fps-1 --eva "
                                "eva_vit_g.pth --out checkpoints/llamavid-7b`, then `python app.py "
                                "versions register checkpoints/llamavid-7b`)")
            parent = ensure_registered(base, url)
    with session_scope(url) as s:
        return s.scalar(select(ModelVersion.id).where(ModelVersion.name == parent["name"]))


def create_job(snapshot: str | int, from_version: str | None = None, options: dict | None = None,
               url: str | None = None, pid: int | None = None) -> int:
    """A queued job row; refused while another job is queued or running."""
    from annotation.versions import find_version, models_dir

    opts = TrainOptions.from_dict(options)
    if opts.name and (find_version(opts.name, url) or (models_dir() / opts.name).exists()):
        raise UserError(f"a model version named {opts.name!r} exists already")
    parent_id = _resolve_parent(from_version, url)
    with _one_at_a_time():
        recover_jobs(url)
        with session_scope(url) as s:
            busy = s.scalar(select(FinetuneJob).where(FinetuneJob.status.in_(ACTIVE)))
            if busy is not None:
                raise UserError(f"fine-tune job {busy.id} is still {busy.status}; one job trains at a time "
                                f"(cancel it or wait)")
            snapshot_id = _resolve_snapshot(snapshot, s).id
            job = FinetuneJob(status="queued", snapshot_id=snapshot_id, from_version_id=parent_id,
                              config=asdict(opts), pid=pid)
            s.add(job)
            s.flush()
            if opts.name is None:  # fixed now, so a resumed job writes the same version
                job.config = {**job.config, "name": _free_name(f"v{job.id}", url)}
            job.out_dir = str(job_dir(job.id))
            job.log_path = str(job_dir(job.id) / "events.jsonl")
            return job.id


def _free_name(name: str, url: str | None) -> str:
    from annotation.versions import find_version, models_dir

    candidate, n = name, 1
    while find_version(candidate, url) or (models_dir() / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def start_job(snapshot: str | int, from_version: str | None = None, options: dict | None = None,
              url: str | None = None) -> int:
    """Create a job and start its training subprocess; returns the job id at once."""
    job_id = create_job(snapshot, from_version, options, url)
    _spawn(job_id, ["--job-id", str(job_id)], url)
    return job_id


def _spawn(job_id: int, args: list[str], url: str | None) -> None:
    env = dict(os.environ)
    if url:
        env["EMO_DB_URL"] = url
    try:
        with open(job_dir(job_id) / "process.log", "ab") as out:
            # Its own session: a Ctrl-C in the app's terminal does not kill the training.
            process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "finetune", *args], cwd=ROOT,
                                       env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        set_job_status(job_id, "failed", url, error=f"cannot start the training process: {exc}")
        raise UserError(f"cannot start the training process: {exc}") from None
    set_job_status(job_id, "running", url, pid=process.pid)


def set_job_status(job_id: int, status: str, url: str | None = None, error: str | None = None,
                   metrics: dict | None = None, pid: int | None = None) -> None:
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        job.status, job.error = status, error
        if pid is not None:
            job.pid = pid
        if status == "running":
            job.started_at, job.finished_at = job.started_at or _now(), None
        elif status not in ACTIVE:
            job.finished_at = _now()
        if metrics:
            job.metrics = {**(job.metrics or {}), **metrics}


# ====================================================================== following

def _log_path(job_id: int, url: str | None) -> Path:
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        return Path(job.log_path or job_dir(job_id) / "events.jsonl")


def _parse(lines: list[str]) -> list[dict]:
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now: the next read gets it whole
    return events


def read_events(job_id: int, since: int = 0, url: str | None = None) -> list[dict]:
    """The job's JSONL events from line `since` on."""
    path = _log_path(job_id, url)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return _parse(f.read().splitlines()[since:])


def loss_curve(events: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) once per step, in step order. A resumed job repeats the steps after its
    checkpoint and logs them again (the log is append-only, so followers can read it by line);
    the later entry is the one the finished run stands on, so it wins."""
    latest: dict[int, float] = {}
    for e in events:
        if e.get("event") == "step" and e.get("loss") is not None:
            latest[int(e["step"])] = float(e["loss"])
    return sorted(latest.items())


def _recent_events(path: Path, size: int = 65536) -> list[dict]:
    """The last events of a log, without reading a long job's whole log on every poll."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        lines = f.read().decode("utf-8", "replace").splitlines()
        if f.tell() > size:
            lines = lines[1:]  # the first line is cut
    return _parse(lines)


def _alive(pid: int | None, marker: bytes = b"finetune") -> bool:
    """Is `pid` a live job process whose command line holds `marker` (not a zombie, not an
    unrelated process that got the pid after a reboot)?"""
    import psutil

    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, finished: reap it
            return False
    except ChildProcessError:
        pass
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return marker.decode() in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # a process we may not inspect exists all the same


def _last_error(job_id: int) -> str | None:
    """The error a crashed trainer printed last (a CLI error line or a traceback's last line)."""
    path = job_dir(job_id) / "process.log"
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()[-50:]):
        if line.startswith("error: ") or re.match(r"^[\w.]+(Error|Exception)\b", line):
            return line[:300]
    return None


def _settle(job: FinetuneJob, final: dict | None) -> None:
    """A job whose process is gone: its last event says how it ended."""
    if final is None:
        job.status = "failed"
        job.error = (f"the training process ended without finishing ({_last_error(job.id) or 'killed?'}); "
                     f"`python app.py finetune --resume {job.id}` continues from its last checkpoint")
    else:
        job.status, job.error = FINAL_EVENTS[final["event"]], final.get("error")
        job.metrics = {**(job.metrics or {}), **final.get("metrics", {})}
    job.finished_at = job.finished_at or _now()


def job_status(job_id: int, url: str | None = None) -> dict:
    """The job as the database and its log know it; a job whose process died is settled here.

    Returns dict(id, status, step, total_steps, loss, eta_s, error, log_path, version,
    published, metrics, pid, snapshot_id, created_at).
    """
    events = _recent_events(_log_path(job_id, url))
    last_step = next((e for e in reversed(events) if e.get("event") == "step"), {})
    final = next((e for e in reversed(events) if e.get("event") in FINAL_EVENTS), None)
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=timezone.utc)
        if job.status == "running" and not _alive(job.pid):
            _settle(job, final)
        elif job.status == "queued" and not _alive(job.pid) and (
                job.pid or (_now() - created).total_seconds() > QUEUED_GRACE_S):
            _settle(job, None)
        status = {"id": job.id, "status": job.status, "step": last_step.get("step", 0),
                  "total_steps": last_step.get("total_steps") or _first_total_steps(job_id, url, events),
                  "loss": last_step.get("loss"), "eta_s": last_step.get("eta_s"), "error": job.error,
                  "log_path": job.log_path, "pid": job.pid, "snapshot_id": job.snapshot_id,
                  "version": (final or {}).get("version"), "published": (final or {}).get("published"),
                  "metrics": job.metrics or {}, "created_at": created.isoformat()}
    # A read changes nothing: a version the job published reaches the engine of the web process
    # through the registry watcher (webapp.app.follow_registry), which swaps on the registry row.
    return status


def _first_total_steps(job_id: int, url: str | None, recent: list[dict]) -> int | None:
    start = next((e for e in reversed(recent) if e.get("event") == "start"), None)
    if start is None:
        start = next((e for e in read_events(job_id, url=url)[:1] if e.get("event") == "start"), {})
    return start.get("total_steps")


def list_jobs(url: str | None = None, limit: int | None = None) -> list[dict]:
    """Every job (the newest `limit`), newest first, as job_status gives it."""
    with session_scope(url) as s:
        ids = list(s.scalars(select(FinetuneJob.id).order_by(FinetuneJob.id.desc()).limit(limit)))
    return [job_status(i, url) for i in ids]


def recover_jobs(url: str | None = None) -> list[dict]:
    """On app start: settle every queued/running job whose process is gone (from its log)."""
    with session_scope(url) as s:
        ids = list(s.scalars(select(FinetuneJob.id).where(FinetuneJob.status.in_(ACTIVE))))
    return [job_status(i, url) for i in ids]


# ====================================================================== stopping and resuming

def cancel_job(job_id: int, url: str | None = None) -> dict:
    """A clean stop: SIGTERM, on which the trainer saves a checkpoint and logs 'cancelled'."""
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        if job.status not in ACTIVE:
            raise UserError(f"job {job_id} is {job.status}, not running")
        pid = job.pid
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
    else:
        set_job_status(job_id, "cancelled", url)
    return job_status(job_id, url)


def resume_job(job_id: int, url: str | None = None, background: bool = True) -> int:
    """Continue a killed, failed or cancelled job from its last checkpoint, same data order.
    `background=False` only requeues it (the CLI then trains in its own process)."""
    status = job_status(job_id, url)
    if status["status"] in ACTIVE:
        raise UserError(f"job {job_id} is still {status['status']}")
    if status["status"] == "succeeded":
        raise UserError(f"job {job_id} has finished already")
    with _one_at_a_time():
        with session_scope(url) as s:
            busy = s.scalar(select(FinetuneJob).where(FinetuneJob.status.in_(ACTIVE)))
            if busy is not None:
                raise UserError(f"fine-tune job {busy.id} is still {busy.status}; one job trains at a time")
            job = s.get(FinetuneJob, job_id)
            job.status, job.error, job.finished_at = "queued", None, None
            job.pid = None if background else os.getpid()
    if background:
        _spawn(job_id, ["--job-id", str(job_id), "--resume-checkpoint"], url)
    return job_id
