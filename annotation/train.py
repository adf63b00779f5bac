"""The trainer of a fine-tune job: LoRA adapter + connector modules on an export snapshot.

    python app.py finetune --snapshot 3 [--from-version v2] [--epochs 2]      # one process
    accelerate launch --config_file docs/accelerate/ddp.yaml app.py finetune --snapshot 3

`train_job(job_id)` runs in the subprocess `annotation.finetune.start_job` spawns, or in the CLI
process (once per rank under `accelerate launch`). In reading order:

1. the data: the snapshot's train records plus, every epoch, a fresh seeded draw of earlier
   training data (the snapshots the parent version and its ancestors were trained on) against
   forgetting. The order of an epoch is a pure function of (seed, epoch), and optimizer step `s`
   always sees the same samples, so a resumed job continues exactly where it was killed.
   A sample is prepared (decode, faces, image processing, tokens) by a loader, `num_workers`
   processes ahead of the step (0: in the trainer), and its frozen vision features are computed
   alone; the feature cache keeps both from the first epoch on (in CPU memory, up to
   EMO_FEATURE_CACHE_MB, 4096 by default), so later epochs run only the trainable parts;
2. the model: the parent version's checkpoint (frozen base in bf16 on GPU; the trainable LoRA and
   connector weights in fp32 under autocast), AdamW, a transformers LR schedule, `accelerate`
   for devices and processes;
3. the loop: micro-batches accumulated into optimizer steps, JSONL events, compact checkpoints
   (trainable weights + per-rank optimizer and RNG state + schedule + step; the frozen base is
   never copied), SIGTERM -> checkpoint -> "cancelled";
4. the end: the version folder written to `models/.tmp-<name>` and renamed into place, evaluated
   on the held-out split against its parent, published when the UAR gate passes.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from db.models import Dataset, ExportSnapshot, FinetuneJob, ModelVersion
from db.session import session_scope

log = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable.safetensors"
LATEST_FILE = "latest"   # names the newest complete checkpoint folder


# ====================================================================== 1. the data

def lineage_snapshots(parent: dict, url: str | None = None) -> list[Path]:
    """The snapshot folders `parent` and its ancestors were trained on, newest first."""
    from annotation.versions import find_version

    paths, seen, version = [], set(), parent
    while version is not None and version["name"] not in seen:
        seen.add(version["name"])
        if version.get("snapshot_id"):
            with session_scope(url) as s:
                row = s.get(ExportSnapshot, version["snapshot_id"])
                if row is not None and Path(row.path).exists() and Path(row.path) not in paths:
                    paths.append(Path(row.path))
        version = find_version(version["parent"], url) if version.get("parent") else None
    return paths


@dataclass
class TrainingData:
    """This job's records plus a replay pool; `epoch(e)` is the e-th epoch's sample order."""
    records: list[dict]
    earlier: list[dict]
    replay_ratio: float
    seed: int

    @property
    def replay_per_epoch(self) -> int:
        return min(len(self.earlier), int(round(self.replay_ratio * len(self.records))))

    def __len__(self) -> int:
        return len(self.records) + self.replay_per_epoch

    def epoch(self, epoch: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, epoch])
        replay = [self.earlier[i] for i in rng.choice(len(self.earlier), self.replay_per_epoch, replace=False)]
        items = self.records + replay
        return [items[i] for i in rng.permutation(len(items))]


def _snapshot_records(snapshot: Path) -> list[dict]:
    """A snapshot's records, each with its snapshot's label set (in memory: the category
    question is asked again over it with the trained model's recipe)."""
    from annotation.export import read_records

    manifest = Path(snapshot) / "manifest.json"
    labels = json.loads(manifest.read_text()).get("label_set") if manifest.exists() else None
    records = read_records(snapshot)
    if labels:
        for r in records:
            r.setdefault("label_set", labels)
    return records


def load_training_data(snapshot: Path, earlier: list[Path], replay_ratio: float, seed: int) -> TrainingData:
    """Train-split records of `snapshot`; the replay pool is the train records of the `earlier`
    snapshots that this one does not answer anew (a newer correction replaces an older one)."""
    records = [r for r in _snapshot_records(snapshot) if r.get("split", "train") == "train"]
    seen = {r["id"] for r in records}
    pool = []
    for path in earlier:
        if path.resolve() == snapshot.resolve():
            continue
        for r in _snapshot_records(path):
            if r.get("split", "train") == "train" and r["id"] not in seen:
                seen.add(r["id"])
                pool.append(r)
    return TrainingData(records, pool, replay_ratio, seed)


def step_samples(items: list[dict], within: int, per_step: int, world: int) -> list[dict]:
    """The samples of optimizer step `within` of an epoch. With several processes the last step
    is padded from the epoch's start so that every rank runs the same number of passes."""
    chunk = items[within * per_step:(within + 1) * per_step]
    while world > 1 and len(chunk) < per_step:
        chunk += items[:per_step - len(chunk)]
    return chunk


def question_and_answer(record: dict, config=None) -> tuple[str, str]:
    """(question, answer) of a record. The question is asked with `config`'s recipe (the trained
    model's phrasings, core/model/recipe.py), which is what the model is asked at serving time;
    without a config, or for a record the recipe cannot re-ask, the record's own text."""
    from core.model.recipe import record_question, record_text_question

    answer = next(t["value"] for t in record["conversations"] if t["from"] == "gpt")
    if config is None:
        return record_text_question(record), answer
    return record_question(record, config, record.get("label_set")), answer


def record_key(record: dict) -> str:
    """What a prepared sample is a pure function of within one job (the recipe's question is
    deterministic, the frozen base and the frame count are the job's)."""
    return str(record.get("id") or record.get("image") or record.get("video"))


class SampleDataset(torch.utils.data.Dataset):
    """Records -> (EmoInput, answer): decode, face analysis and `prepare`'s CPU part (the image
    processor, the tokenizers). Runs in DataLoader workers when there are any; `skip` names the
    samples the feature cache already holds (they come back as None, at no cost)."""

    def __init__(self, records: list[dict], prepare, skip=frozenset()):
        self.records, self.prepare, self.skip = records, prepare, skip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        if record_key(record) in self.skip:
            return None
        x, answer = self.prepare(record)
        # The prepared media's lock does not cross a process boundary; the trainer re-attaches it.
        return (dataclasses.replace(x, media=None) if torch.utils.data.get_worker_info() else x), answer


def with_media(x):
    """`x` with a PreparedMedia to carry its frozen features to the model (a sample from a
    worker process comes without one)."""
    from core.model.modeling import PreparedMedia

    if x.media is not None:
        return x
    return dataclasses.replace(x, media=PreparedMedia(x.kind, x.pixel_values, x.face_pixels, x.face_landmarks,
                                                      x.prior_embeddings))


def _one_sample(items: list):
    return items[0]  # batch_size=1 + this collate: a sample as prepared, no tensor stacking


def sample_loader(records: list[dict], prepare, skip: set[str], num_workers: int, seed: int):
    """The prepared samples of `records`, in order, `num_workers` ahead of the training step.
    Its own generator: making an iterator draws a worker seed, and a draw from the global RNG
    would move LoRA dropout off the uninterrupted run's (resume reproduces it exactly)."""
    from torch.utils.data import DataLoader

    # In this process with no workers (the per-path face cache then lives on across epochs), and
    # when the cache holds everything (starting workers would cost more than they save).
    if num_workers == 0 or all(record_key(r) in skip for r in records):
        return map(SampleDataset(records, prepare, skip).__getitem__, range(len(records)))
    return iter(DataLoader(SampleDataset(records, prepare, skip), batch_size=1, collate_fn=_one_sample,
                           num_workers=num_workers, prefetch_factor=4, multiprocessing_context="fork",
                           generator=torch.Generator().manual_seed(seed),
                           worker_init_fn=_quiet_tokenizers))


def _quiet_tokenizers(_worker: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked worker must not start Rust threads


def frozen_features(core, x) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's frozen vision-tower features (frames, aligned faces), computed alone: their
    values then never depend on which other samples share a micro-batch, so a cached sample, a
    fresh one and a resumed run see bit-identical features."""
    from core.model.vision import encoder_features

    if hasattr(core, "frozen_features"):  # a VLM base: its own image pathway (core/model/vlm.py)
        return core.frozen_features(x)
    frames = x.pixel_values.shape[0]
    pixels = x.pixel_values if x.face_pixels is None else torch.cat([x.pixel_values, x.face_pixels])
    with torch.no_grad():
        features = encoder_features(core.vision, pixels.to(core.device, core.dtype), core.config.vision_select_layer)
    return features[:frames], features[frames:]


class FeatureCache:
    """Prepared samples with their frozen features, kept from the first epoch on: the vision tower
    and face analysis never change while the LoRA and connector train, so from epoch 2 a cached
    sample costs no decode, no face pass, no image processing and no vision pass. Features live
    in CPU memory (device memory is the LLM's) up to `budget_mb`; samples past it are prepared
    afresh each epoch as without a cache. `enabled=False` keeps nothing."""

    def __init__(self, enabled: bool = True, budget_mb: float = 4096):
        self.enabled, self.budget = enabled, budget_mb * 2 ** 20
        self.entries: dict[str, tuple] = {}
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> tuple:
        return self.entries[key]

    def put(self, key: str, sample: tuple, frames: torch.Tensor, faces: torch.Tensor) -> None:
        x = sample[0]
        size = sum(t.numel() * t.element_size() for t in (frames, faces, x.pixel_values, x.face_pixels,
                                                         x.prior_embeddings) if t is not None)
        if self.enabled and key not in self.entries and self.bytes + size <= self.budget:
            self.entries[key] = (sample, frames.cpu(), faces.cpu())
            self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def micro_batch(records: list[dict], upcoming, cache: FeatureCache, core, prepare, autocast) -> list[tuple]:
    """The (EmoInput, answer) pairs of a micro-batch, each carrying its frozen features to the
    model: from the cache, or prepared (by the loader `upcoming`, which yields one item per
    record in order) with features computed now and offered to the cache."""
    batch = []
    for r in records:
        key, prepared = record_key(r), next(upcoming)
        if key in cache:
            sample, frames, faces = cache.get(key)
        else:
            sample = prepared if prepared is not None else prepare(r)
            sample = (with_media(sample[0]), sample[1])
            with autocast():  # the dtype the forward's own vision pass would give
                frames, faces = frozen_features(core, sample[0])
            cache.put(key, sample, frames, faces)
        # The model reads a request's features from its prepared media: no vision pass.
        sample[0].media.keep_features(core.vision, core.dtype, frames.to(core.device), faces.to(core.device))
        batch.append(sample)
    return batch


def release(batch: list[tuple]) -> None:
    """Drop a micro-batch's device copies of its features (the cache keeps its CPU ones)."""
    for x, _ in batch:
        x.media.forget_features()


# ====================================================================== 2. the model

def load_trainable(folder: str | Path, bf16: bool):
    """The checkpoint with its LoRA adapter and connector modules trainable. On bf16 the frozen
    base is stored in bf16 (14 GB for a 7B LLM, not 28) and the trainable weights stay fp32:
    autocast computes in bf16 while AdamW updates full-precision master weights."""
    from core.model.loading import load_model

    model = load_model(folder, dtype=torch.bfloat16 if bf16 else torch.float32, trainable=True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute the LLM layers' activations in the backward pass instead of keeping them.
    Non-reentrant: it needs no input that requires grad, and it works under DDP."""
    model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by parameter name as full CPU tensors (an FSDP2 shard is gathered, so
    every rank must call this)."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().cpu().contiguous()
    return state


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a job (the pointer is written last, atomically)."""
    pointer = out_dir / LATEST_FILE
    if not pointer.exists():
        return None
    folder = out_dir / pointer.read_text().strip()
    return folder if (folder / "state.pt").exists() else None


class EventLog:
    """Appends one JSON object per line; only the main process writes."""

    def __init__(self, path: Path, is_main: bool = True):
        self.path, self.is_main = path, is_main

    def __call__(self, event: str, **fields) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")


# ====================================================================== 3. the loop

def train_job(job_id: int, resume: bool = False, url: str | None = None) -> int:
    """Run job `job_id` in this process; returns the exit code (0 done, 130 cancelled, 1 failed)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType
    from safetensors.torch import load_file, save_file
    from transformers import get_scheduler

    from annotation.finetune import TrainOptions, set_job_status
    from annotation.versions import find_version, models_dir
    from core.faces import FaceConfig, shared_analyzer
    from core.media import load_media
    from core.model.recipe import frames as recipe_frames

    with session_scope(url) as s:
        job = s.get(FinetuneJob, job_id)
        if job is None:
            raise UserError(f"no fine-tune job {job_id}")
        opts = TrainOptions.from_dict(job.config)
        snapshot = s.get(ExportSnapshot, job.snapshot_id)
        snapshot_path, snapshot_id = Path(snapshot.path), snapshot.id
        dataset_name = s.get(Dataset, snapshot.dataset_id).name
        parent_row = s.get(ModelVersion, job.from_version_id) if job.from_version_id else None
        parent_name = parent_row.name if parent_row else None
        out_dir = Path(job.out_dir)
    want_bf16 = opts.precision == "bf16" or (opts.precision == "auto" and torch.cuda.is_available())
    # find_unused_parameters: a batch without faces leaves the face modules out of the graph.
    # mixed_precision=None leaves the choice to an `accelerate launch` config.
    accelerator = Accelerator(mixed_precision="bf16" if want_bf16 else None, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    bf16 = accelerator.mixed_precision == "bf16"
    if is_main:
        set_job_status(job_id, "running", url, pid=os.getpid())
    events = EventLog(out_dir / "events.jsonl", is_main)
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True))
    try:
        parent = find_version(parent_name, url) if parent_name else None
        if parent is None:
            raise UserError(f"job {job_id} has no model version to start from")
        name = opts.name or f"v{job_id}"
        written = models_dir() / name
        if resume and written.exists() and (find_version(name, url) or {}).get("job_id") in (None, job_id):
            # Killed after its version was written (folders appear whole): only the end is left.
            return finish(job_id, name, written, parent, snapshot_id, dataset_name, opts, events, stop,
                          str(accelerator.device), url) if is_main else 0
        data = load_training_data(snapshot_path, lineage_snapshots(parent, url), opts.replay_ratio, opts.seed)
        if not data.records:
            raise UserError(f"snapshot {snapshot_path.name} has no train-split records")

        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if deepspeed:  # DeepSpeed wants the micro-batch and accumulation in its own config
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = opts.batch_size
            ds_config["gradient_accumulation_steps"] = opts.grad_accum
        torch.manual_seed(opts.seed)  # a fresh adapter starts the same whatever the number of processes
        model = load_trainable(parent["folder"], bf16)
        checkpoint = latest_checkpoint(out_dir) if resume else None
        state = torch.load(checkpoint / "state.pt", weights_only=False) if checkpoint else None
        if state is not None:
            if state["parent"] != parent["name"]:
                raise UserError(f"{checkpoint} continues {state['parent']}, not {parent['name']}")
            if state["world_size"] != world:
                raise UserError(f"job {job_id}'s checkpoint was written by {state['world_size']} process(es); "
                                f"resume it with the same number (not {world}) to keep the data order")
            unexpected = model.load_state_dict(load_file(checkpoint / TRAINABLE_FILE), strict=False).unexpected_keys
            if unexpected:
                raise UserError(f"{checkpoint} does not fit {parent['name']}: {unexpected[:3]}")
        if opts.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr,
                                      weight_decay=0.0)
        per_step = opts.batch_size * opts.grad_accum * world    # samples per optimizer step
        steps_per_epoch = math.ceil(len(data) / per_step)
        total_steps = opts.max_steps or steps_per_epoch * opts.epochs
        # The schedule is stepped by hand once per optimizer step (a prepared one would step once
        # per process), so it runs the same with 1 or 8 processes.
        scheduler = get_scheduler(opts.scheduler, optimizer, num_warmup_steps=int(opts.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        core = accelerator.unwrap_model(model)
        step = 0
        if state is not None:
            own = torch.load(checkpoint / f"rank{rank}.pt", weights_only=False)
            optimizer.load_state_dict(own["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step = state["step"]
        events("start", job=job_id, parent=parent["name"], samples=len(data.records),
               replayed_per_epoch=data.replay_per_epoch, total_steps=total_steps,
               resumed_from=step if state is not None else None, processes=world,
               strategy=str(accelerator.distributed_type).split(".")[-1], bf16=bf16,
               options=asdict(opts), device=str(accelerator.device))

        # Face analysis is the CPU-heavy part of a sample: once per file per job, not per epoch.
        analyzer = shared_analyzer(FaceConfig(prior=core.config.prior))
        faces_cache: dict[str, list] = {}

        # Frames per video: the option when given, else the recipe of the model being trained.
        num_frames = recipe_frames(core.config, opts.num_frames)

        def example(record: dict):
            path = record.get("image") or record.get("video")
            media = load_media(path, num_frames=num_frames)
            if path not in faces_cache:
                faces_cache[path] = [analyzer.analyze(frame, aligned=bool(record.get("aligned")))
                                     for frame in media.frames]
            question, answer = question_and_answer(record, core.config)
            return core.prepare(media.frames, faces_cache[path], question), answer

        def stop_requested() -> bool:
            if world == 1:
                return stop["requested"]
            flag = torch.tensor([float(stop["requested"])], device=accelerator.device)
            return bool(accelerator.reduce(flag, reduction="sum").item() > 0)  # all ranks stop together

        def save_checkpoint() -> Path:
            weights = trainable_state(core)  # a collective under FSDP: every rank calls it
            folder = out_dir / f"checkpoint-{step}"
            if is_main:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            accelerator.wait_for_everyone()
            torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, folder / f"rank{rank}.pt")
            accelerator.wait_for_everyone()
            if is_main:
                save_file(weights, folder / TRAINABLE_FILE)
                torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": world,
                            "parent": parent["name"]}, folder / "state.pt")
                pointer = out_dir / f"{LATEST_FILE}.tmp"
                pointer.write_text(folder.name)
                os.replace(pointer, out_dir / LATEST_FILE)  # the switch to the new checkpoint is atomic
                for old in out_dir.glob("checkpoint-*"):
                    if old != folder:
                        shutil.rmtree(old, ignore_errors=True)
                events("checkpoint", step=step, path=str(folder))
            accelerator.wait_for_everyone()
            return folder

        if state is not None:  # last, so nothing set up above (the face networks) draws from it
            _set_rng_state(own["rng"])
        model.train()
        cache = FeatureCache(opts.feature_cache, float(os.environ.get("EMO_FEATURE_CACHE_MB", 4096)))
        started, first_step, items, items_epoch, upcoming = time.time(), step, [], None, iter(())
        while step < total_steps and not stop_requested():
            epoch, within = divmod(step, steps_per_epoch)
            if epoch != items_epoch:
                items, items_epoch = data.epoch(epoch), epoch
                # This rank's samples for the rest of the epoch, in the order the steps use them,
                # prepared ahead by the loader (those the cache holds come back as None).
                ahead = [r for w in range(within, steps_per_epoch)
                         for r in step_samples(items, w, per_step, world)[rank::world]]
                upcoming = sample_loader(ahead, example, cache.entries if opts.num_workers == 0
                                         else set(cache.entries), opts.num_workers, opts.seed)
            mine = step_samples(items, within, per_step, world)[rank::world]
            micro_batches = [mine[i:i + opts.batch_size] for i in range(0, len(mine), opts.batch_size)]
            total_loss = 0.0
            for k, records in enumerate(micro_batches):
                batch = micro_batch(records, upcoming, cache, core, example, accelerator.autocast)
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                sync = k == len(micro_batches) - 1 or deepspeed
                with _maybe_no_sync(accelerator, model, sync):  # (prepare() added the autocast)
                    loss = model([b[0] for b in batch], [b[1] for b in batch])
                # DeepSpeed divides by its accumulation steps itself.
                weight = 1.0 if deepspeed else len(records) / len(mine)
                accelerator.backward(loss * weight)
                total_loss += loss.item() * len(records) / len(mine)
                release(batch)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if world > 1:
                total_loss = accelerator.reduce(torch.tensor(total_loss, device=accelerator.device), "mean").item()
            elapsed = max(time.time() - started, 1e-6)
            events("step", step=step, total_steps=total_steps, epoch=epoch, loss=round(total_loss, 5),
                   lr=scheduler.get_last_lr()[0], samples_per_s=round((step - first_step) * per_step / elapsed, 2),
                   eta_s=round((total_steps - step) * elapsed / (step - first_step), 1),
                   cached_samples=len(cache.entries))
            if step % opts.checkpoint_every == 0 and step < total_steps:
                save_checkpoint()
        upcoming = None  # shuts the loader's workers down
        cached_samples = len(cache.entries)
        cache.clear()
        if step < total_steps:  # stopped by SIGTERM: keep what was learnt, resumable
            folder = save_checkpoint()
            events("cancelled", step=step, checkpoint=str(folder), cached_samples=cached_samples)
            if is_main:
                set_job_status(job_id, "cancelled", url)
            return 130

        # ------------------------------------------------------------------ 4. the end
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        weights = trainable_state(core) if fsdp else None  # gathering shards is a collective
        if is_main:
            folder = write_version(core, weights, name, parent, bf16=bf16)
        del model, core, optimizer, scheduler, faces_cache, weights
        accelerator.free_memory()  # evaluation loads models of its own
        gc.collect()
        if not is_main:
            return 0
        return finish(job_id, name, folder, parent, snapshot_id, dataset_name, opts, events,
                      stop, str(accelerator.device), url)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, UserError):
            log.exception("fine-tune job %s failed", job_id)
        events("failed", error=message)
        if is_main:
            set_job_status(job_id, "failed", url, error=message)
        if isinstance(exc, UserError):
            raise
        return 1


def _maybe_no_sync(accelerator, model, sync: bool):
    from contextlib import nullcontext

    return nullcontext() if sync else accelerator.no_sync(model)


# ====================================================================== 4. the end

def write_version(core, weights: dict | None, name: str, parent: dict, bf16: bool) -> Path:
    """The new version's folder, complete or absent: written beside its final place and renamed.
    `weights`: the trainable weights gathered from FSDP shards (None: `core` holds them whole)."""
    from annotation.versions import models_dir

    if weights is not None:  # the trained model holds shards: write from a plain copy
        core = load_trainable(parent["folder"], bf16)
        core.load_state_dict(weights, strict=False)
    tmp = models_dir() / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    core.config.parent_version = parent["name"]
    core.config.label_temperature = 1.0   # the parent's fit does not carry over: evaluation fits anew
    core.save_pretrained(tmp, version=name)
    final = models_dir() / name
    if final.exists():
        raise UserError(f"{final} exists already; choose another version name")
    os.replace(tmp, final)
    return final


def finish(job_id: int, name: str, folder: Path, parent: dict, snapshot_id: int, dataset: str,
           opts, events: EventLog, stop: dict, device: str, url: str | None) -> int:
    """Register the version, evaluate it and its parent on the held-out split, gate, publish."""
    from annotation.evaluate import evaluate_version
    from annotation.finetune import set_job_status
    from annotation.versions import find_version, gate, publish, register_version
    from core.model.config import EmoLlamaConfig

    if find_version(name, url) is None:
        register_version(name, folder, parent=parent["name"], snapshot_id=snapshot_id, job_id=job_id,
                         is_tiny=EmoLlamaConfig.load(folder).is_tiny, url=url)
    key = f"{dataset}/{opts.eval_split}"
    try:
        new = evaluate_version(name, dataset, opts.eval_split, url=url, num_frames=opts.num_frames, device=device)
        old = (find_version(parent["name"], url)["metrics"] or {}).get(key)
        # The stored parent score counts only if it was measured on the very same samples.
        if old is None or old.get("samples") != new["samples"]:
            old = evaluate_version(parent["name"], dataset, opts.eval_split, url=url,
                                   num_frames=opts.num_frames, device=device)
    except UserError as exc:  # e.g. no labelled test split: trained, kept, but nothing to gate on
        events("done", version=name, published=False, gate=f"not evaluated: {exc}", metrics={})
        set_job_status(job_id, "succeeded", url)
        return 0
    events("eval", version=name, split=key, uar=new["uar"], war=new["war"], parent_uar=old["uar"],
           parent_war=old["war"], per_class_recall=new["per_class_recall"], rouge_l=new["rouge_l"],
           confusion_png=new["confusion_png"])
    metrics = {"uar": new["uar"], "war": new["war"], "parent_uar": old["uar"], "rouge_l": new["rouge_l"]}
    if stop["requested"]:  # cancelled while evaluating: the version stays, unpublished
        events("cancelled", version=name, metrics=metrics)
        set_job_status(job_id, "cancelled", url, metrics=metrics)
        return 130
    ok, why = gate(find_version(name, url), find_version(parent["name"], url), key, opts.gate_margin)
    if ok:
        publish(name, key=key, margin=opts.gate_margin, url=url)
    events("done", version=name, published=ok, gate=why, metrics=metrics)
    set_job_status(job_id, "succeeded", url, metrics=metrics)
    return 0
