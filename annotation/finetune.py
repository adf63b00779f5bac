"""Incremental LoRA fine-tuning on an export snapshot, as a job the web app can drive.

    python app.py finetune --snapshot 3 [--from-version v2] [--epochs 2] [--name v3]
    python app.py finetune --resume 7                      # continue killed job 7
    accelerate launch app.py finetune --snapshot 3         # several GPUs (docs/accelerate/*.yaml)

A job trains the serving (or `--from-version`) checkpoint's LoRA adapter and connector modules
on the snapshot's train split, mixed with a replay sample of the parent version's training data
against forgetting; writes JSONL events (start, step, checkpoint, eval, done | failed | cancelled)
to its log; checkpoints every `checkpoint_every` steps (model + optimizer + scheduler + step, the
data order is a seeded permutation, so `--resume` continues exactly); evaluates on the held-out
test split; and publishes the result as a new model version only when the UAR gate passes.

The runner half (`start_job`, `job_status`, `read_events`, `cancel_job`, `recover_jobs`) starts
the training as a subprocess, records it in the database and follows its log, so a page reload
or an app restart finds the job where it is. One training job runs at a time.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select

from core.errors import UserError
from db.models import ExportSnapshot, FinetuneJob, ModelVersion
from db.session import data_dir, session_scope

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
ACTIVE = ("queued", "running")


@dataclass
class TrainOptions:
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    replay_ratio: float = 0.2        # replayed parent samples per new sample
    seed: int = 0
    checkpoint_every: int = 50       # optimizer steps
    max_steps: int | None = None
    num_frames: int = 4
    gradient_checkpointing: bool = False
    gate_margin: float = 0.0         # allowed UAR drop against the parent
    name: str | None = None          # the new version's name (default v<job id>)

    @classmethod
    def from_dict(cls, values: dict | None) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(values or {}) - known
        if unknown:
            raise UserError(f"unknown fine-tune options: {', '.join(sorted(unknown))}")
        return cls(**(values or {}))


# ====================================================================== the runner (app side)

def job_dir(job_id: int) -> Path:
    path = data_dir() / "jobs" / str(job_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _resolve_snapshot_id(snapshot: str | int, url: str | None) -> int:
    with session_scope(url) as s:
        if str(snapshot).isdigit():
            row = s.get(ExportSnapshot, int(snapshot))
        else:
            row = s.scalar(select(ExportSnapshot).where(
                (ExportSnapshot.path == str(Path(snapshot).resolve())) | (ExportSnapshot.content_hash == str(snapshot))))
        if row is None:
            raise UserError(f"no export snapshot {snapshot!r}; make one with `python app.py export`")
        return row.id


def create_job(snapshot: str | int, from_version: str | None = None, options: dict | None = None,
               url: str | None = None) -> int:
    """A queued job row (refused while another job is active: one training job per device)."""
    recover_jobs(url)
    opts = TrainOptions.from_dict(options)
    snapshot_id = _resolve_snapshot_id(snapshot, url)
    with session_scope(url) as s:
        busy = s.scalar(select(FinetuneJob).where(FinetuneJob.status.in_(ACTIVE)))
        if busy is not None:
            raise UserError(f"fine-tune job {busy.id} is still {busy.status}; one job at a time")
        parent = None
        if from_version:
            parent = s.scalar(select(ModelVersion).where(ModelVersion.name == from_version))
            if parent is None:
                raise UserError(f"no model version named {from_version!r}")
        job = FinetuneJob(status="queued", snapshot_id=snapshot_id, config=asdict(opts),
                          from_version_id=parent.id if parent else None)
        s.add(job)
        s.flush()
        job.log_path = str(job_dir(job.id) / "events.jsonl")
        job.out_dir = str(job_dir(job.id))
        return job.id


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
    out = open(job_dir(job_id) / "process.log", "ab")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "finetune", *args], cwd=ROOT,
                               env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        job.pid, job.status, job.started_at = process.pid, "running", job.started_at or _now()


def read_events(job_id: int, since: int = 0, url: str | None = None) -> list[dict]:
    """The job's JSONL events from line `since` on (a torn last line is left for the next read)."""
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        path = Path(job.log_path or job_dir(job_id) / "events.jsonl")
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines()[since:]:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return events


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own finished child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def job_status(job_id: int, url: str | None = None) -> dict:
    """The job as the database and its log know it; a dead 'running' job is settled from its log."""
    events = read_events(job_id, url=url)
    last_step = next((e for e in reversed(events) if e.get("event") == "step"), {})
    final = next((e for e in reversed(events) if e.get("event") in ("done", "failed", "cancelled")), None)
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job.status in ACTIVE and job.status == "running" and not _alive(job.pid):
            if final is None:
                job.status, job.error = "failed", "the training process ended without finishing (killed?)"
            else:
                job.status = {"done": "succeeded", "failed": "failed", "cancelled": "cancelled"}[final["event"]]
                job.error = final.get("error")
                job.metrics = {**(job.metrics or {}), **final.get("metrics", {})}
            job.finished_at = job.finished_at or _now()
        status = {"id": job.id, "status": job.status, "step": last_step.get("step", 0),
                  "total_steps": last_step.get("total_steps") or next(
                      (e.get("total_steps") for e in events if e.get("event") == "start"), None),
                  "loss": last_step.get("loss"), "eta_s": last_step.get("eta_s"), "error": job.error,
                  "log_path": job.log_path, "pid": job.pid, "snapshot_id": job.snapshot_id,
                  "version": (final or {}).get("version"), "published": (final or {}).get("published"),
                  "metrics": job.metrics or {}, "created_at": job.created_at.isoformat()}
    if status["status"] == "succeeded" and status["published"]:
        from annotation.versions import activate_in_engine, find_version

        version = find_version(status["version"], url)
        if version and version["is_serving"]:
            activate_in_engine(version)
    return status


def list_jobs(url: str | None = None) -> list[dict]:
    with session_scope(url) as s:
        ids = list(s.scalars(select(FinetuneJob.id).order_by(FinetuneJob.id.desc())))
    return [job_status(i, url) for i in ids]


def recover_jobs(url: str | None = None) -> list[dict]:
    """After an app restart: settle every job left 'running' whose process is gone."""
    with session_scope(url) as s:
        ids = list(s.scalars(select(FinetuneJob.id).where(FinetuneJob.status.in_(ACTIVE))))
    return [job_status(i, url) for i in ids]


def cancel_job(job_id: int, url: str | None = None) -> dict:
    """Ask the trainer to stop (SIGTERM: it saves a partial checkpoint and logs 'cancelled')."""
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        if job.status not in ACTIVE:
            raise UserError(f"job {job_id} is {job.status}, not running")
        pid = job.pid
        if job.status == "queued" and not pid:
            job.status, job.finished_at = "cancelled", _now()
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
    return job_status(job_id, url)


def resume_job(job_id: int, url: str | None = None, background: bool = True) -> int:
    """Continue a killed/failed/cancelled job from its last checkpoint."""
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
    status = job_status(job_id, url)
    if status["status"] == "running":
        raise UserError(f"job {job_id} is still running")
    if status["status"] == "succeeded":
        raise UserError(f"job {job_id} already finished")
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        job.status, job.error, job.finished_at = "queued", None, None
    if background:
        _spawn(job_id, ["--job-id", str(job_id), "--resume-checkpoint"], url)
    return job_id


# ====================================================================== the trainer (subprocess)

class _EventLog:
    def __init__(self, path: Path, is_main: bool = True):
        self.path, self.is_main = path, is_main

    def __call__(self, event: str, **fields) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def _training_records(snapshot_path: Path, parent_snapshot: Path | None, ratio: float,
                      seed: int) -> tuple[list[dict], int]:
    from annotation.export import read_records

    records = [r for r in read_records(snapshot_path) if r.get("split", "train") == "train"]
    replay: list[dict] = []
    if parent_snapshot and ratio > 0 and parent_snapshot.resolve() != snapshot_path.resolve():
        earlier = [r for r in read_records(parent_snapshot) if r.get("split", "train") == "train"]
        rng = random.Random(seed)
        replay = rng.sample(earlier, min(len(earlier), int(round(ratio * len(records)))))
    return records + replay, len(replay)


def _question_and_answer(record: dict) -> tuple[str, str]:
    human = next(t["value"] for t in record["conversations"] if t["from"] == "human")
    answer = next(t["value"] for t in record["conversations"] if t["from"] == "gpt")
    return human.replace("<image>", "").replace("<video>", "").strip(), answer


def train_job(job_id: int, resume: bool = False, url: str | None = None) -> int:
    """Run job `job_id` in this process (the subprocess `start_job` spawned, or the CLI)."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    from annotation.export import resolve_snapshot
    from annotation.versions import ensure_registered, find_version, gate, models_dir, register_version
    from core.faces import FaceConfig, shared_analyzer
    from core.media import load_media
    from core.model.modeling import EmoLlama

    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        opts = TrainOptions.from_dict(job.config)
        snapshot = s.get(ExportSnapshot, job.snapshot_id)
        snapshot_path, snapshot_id = Path(snapshot.path), snapshot.id
        from_row = s.get(ModelVersion, job.from_version_id) if job.from_version_id else None
        from_name = from_row.name if from_row else None
        out_dir = Path(job.out_dir)
        job.status, job.pid = "running", os.getpid()
        job.started_at = job.started_at or _now()
    events = _EventLog(out_dir / "events.jsonl")
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True))
    try:
        from annotation.versions import serving_version

        parent = find_version(from_name, url) if from_name else serving_version(url)
        if parent is None:
            base = os.environ.get("EMO_LLAMA_MODEL")
            if not base:
                raise UserError("nothing to fine-tune: no serving model version and no EMO_LLAMA_MODEL")
            parent = ensure_registered(base, url)
        parent_snapshot = None
        if parent.get("snapshot_id"):
            with session_scope(url) as s:
                row = s.get(ExportSnapshot, parent["snapshot_id"])
                parent_snapshot = Path(row.path) if row else None
        records, replayed = _training_records(snapshot_path, parent_snapshot, opts.replay_ratio, opts.seed)
        if not records:
            raise UserError(f"snapshot {snapshot_path.name} has no training records")

        accelerator = Accelerator(gradient_accumulation_steps=opts.grad_accum,
                                  mixed_precision="bf16" if torch.cuda.is_available() else "no")
        events.is_main = accelerator.is_main_process
        checkpoint = out_dir / "checkpoint"
        start_folder = checkpoint / "model" if resume and (checkpoint / "state.pt").exists() else Path(parent["folder"])
        torch.manual_seed(opts.seed)
        model = EmoLlama.from_pretrained(start_folder, trainable=True)
        if opts.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(records) / (opts.batch_size * opts.grad_accum))
        total_steps = opts.max_steps or steps_per_epoch * opts.epochs
        scheduler = get_scheduler(opts.scheduler, optimizer, num_warmup_steps=int(opts.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        core = accelerator.unwrap_model(model)
        step = 0
        if start_folder != Path(parent["folder"]):
            state = torch.load(checkpoint / "state.pt", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = state["step"]
        events("start", job=job_id, parent=parent["name"], samples=len(records), replayed=replayed,
               total_steps=total_steps, resumed_from=step if step else None, options=asdict(opts),
               device=str(accelerator.device))

        analyzer = shared_analyzer(FaceConfig(prior=core.config.prior))
        cache: dict[str, tuple] = {}

        def example(record: dict):
            path = record.get("image") or record.get("video")
            if path not in cache:
                media = load_media(path, num_frames=opts.num_frames)
                cache[path] = (media.frames, [analyzer.analyze(f) for f in media.frames])
            frames, faces = cache[path]
            question, answer = _question_and_answer(record)
            return core.prepare(frames, faces, question), answer

        # The data order is a pure function of (seed, epoch): a resumed job sees the same batches.
        def order(epoch: int) -> list[int]:
            return np.random.default_rng([opts.seed, epoch]).permutation(len(records)).tolist()

        def save_checkpoint() -> None:
            if not accelerator.is_main_process:
                return
            tmp = out_dir / "checkpoint.tmp"
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            core.save_pretrained(tmp / "model")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                       tmp / "state.pt")
            if checkpoint.exists():
                import shutil

                shutil.rmtree(checkpoint)
            os.replace(tmp, checkpoint)
            events("checkpoint", step=step)

        model.train()
        started, first_step = time.time(), step
        micro = opts.batch_size
        while step < total_steps and not stop["requested"]:
            epoch, within = divmod(step, steps_per_epoch)
            indices = order(epoch)
            for start in range(within * micro * opts.grad_accum, len(indices), micro):
                batch = [example(records[i]) for i in indices[start:start + micro]]
                with accelerator.accumulate(model):
                    loss = model([b[0] for b in batch], [b[1] for b in batch])
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                elapsed = max(time.time() - started, 1e-6)
                rate = (step - first_step) * micro * opts.grad_accum / elapsed
                events("step", step=step, total_steps=total_steps, epoch=epoch, loss=round(loss.item(), 5),
                       lr=scheduler.get_last_lr()[0], samples_per_s=round(rate, 2),
                       eta_s=round((total_steps - step) * elapsed / max(step - first_step, 1), 1))
                if step % opts.checkpoint_every == 0:
                    save_checkpoint()
                if step >= total_steps or stop["requested"]:
                    break
        if stop["requested"]:
            save_checkpoint()
            events("cancelled", step=step, checkpoint=str(checkpoint))
            _set_status(job_id, "cancelled", url)
            return 130

        name = opts.name or f"v{job_id}"
        if find_version(name, url):
            raise UserError(f"a model version named {name!r} exists already")
        tmp_folder = models_dir() / f".tmp-{name}"
        core.config.parent_version = parent["name"]
        core.save_pretrained(tmp_folder, version=name)
        del model, core, optimizer
        final_folder = models_dir() / name
        os.replace(tmp_folder, final_folder)  # atomic: a version folder is complete or absent
        register_version(name, final_folder, parent=parent["name"], snapshot_id=snapshot_id, job_id=job_id,
                         is_tiny=_is_tiny(final_folder), url=url)

        from annotation.evaluate import evaluate_version

        with session_scope(url) as s:
            dataset = s.get(ExportSnapshot, snapshot_id).dataset_id
            from db.models import Dataset

            dataset_name = s.get(Dataset, dataset).name
        key = f"{dataset_name}/test"
        new_eval = evaluate_version(name, dataset_name, "test", url=url, num_frames=opts.num_frames)
        parent_version = find_version(parent["name"], url)
        if key not in (parent_version.get("metrics") or {}):
            evaluate_version(parent["name"], dataset_name, "test", url=url, num_frames=opts.num_frames)
            parent_version = find_version(parent["name"], url)
        events("eval", version=name, uar=new_eval["uar"], war=new_eval["war"],
               parent_uar=parent_version["metrics"][key]["uar"], rouge_l=new_eval["rouge_l"],
               confusion_png=new_eval["confusion_png"])
        candidate = find_version(name, url)
        ok, why = gate(candidate, parent_version, key, opts.gate_margin)
        if ok:
            from annotation.versions import publish

            publish(name, key=key, margin=opts.gate_margin, url=url)
        metrics = {"uar": new_eval["uar"], "war": new_eval["war"], "parent_uar": parent_version["metrics"][key]["uar"]}
        events("done", version=name, published=ok, gate=why, metrics=metrics)
        _set_status(job_id, "succeeded", url, metrics=metrics)
        return 0
    except BaseException as exc:
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, UserError):
            log.exception("fine-tune job %s failed", job_id)
        events("failed", error=message)
        _set_status(job_id, "failed", url, error=message)
        if isinstance(exc, UserError):
            raise
        return 1


def _is_tiny(folder: Path) -> bool:
    from core.model.config import EmoLlamaConfig

    return EmoLlamaConfig.load(folder).is_tiny


def _set_status(job_id: int, status: str, url: str | None, error: str | None = None,
                metrics: dict | None = None) -> None:
    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        job.status, job.error, job.finished_at = status, error, _now()
        if metrics:
            job.metrics = {**(job.metrics or {}), **metrics}
