"""Corrections -> better model -> serving, end to end on a tiny checkpoint and the real store.

The dataset is learnable: noisy solid-colour images whose colour decides the expression label
(the face detector finds no face in them, so the model learns from its frame tokens). The base
tiny checkpoint guesses; a fine-tune on the exported snapshot must raise UAR on the held-out
test split and get published; a job killed mid-way resumes from its checkpoint, repeats the
steps it lost exactly, and finishes; a fine-tune on wrong labels regresses and is not published;
the engine serves the new version.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from annotation import finetune
from annotation.evaluate import evaluate_version, rouge_l
from annotation.export import export_dataset
from annotation.ingest import import_dataset
from annotation.train import TrainingData, latest_checkpoint, load_training_data, step_samples
from annotation.versions import find_version, register_version, rollback, serving_version
from core.engine import Engine, EngineConfig, set_shared_engine
from core.errors import UserError
from db.models import FinetuneJob, Sample, Suggestion
from db.session import init_db, session_scope
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

COLOURS = {"happiness": (220, 40, 40), "sadness": (40, 40, 220), "surprise": (40, 200, 40)}
OPTIONS = {"epochs": 6, "lr": 3e-3, "batch_size": 6, "checkpoint_every": 6, "num_frames": 1,
           "replay_ratio": 0.0}


def colour_dataset(root, url, name: str, wrong_train_labels: bool = False) -> int:
    """Import 6 train + 3 test images per colour, add one Gemini-style suggestion per sample,
    and export a snapshot (suggestions as the answers); returns the snapshot id."""
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir()
    labels = list(COLOURS)
    rows = []
    for label, colour in COLOURS.items():
        for i in range(9):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{label}-{i}.png"
            Image.fromarray(pixels).save(path)
            split = "train" if i < 6 else "test"
            shown = labels[(labels.index(label) + 1) % 3] if wrong_train_labels and split == "train" else label
            rows.append(f"{path.name},{shown},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    import_dataset("csv", folder / "labels.csv", name, url=url, progress=False)
    with session_scope(url) as s:
        for sample in s.query(Sample).join(Sample.dataset).filter_by(name=name):
            s.add(Suggestion(sample_id=sample.id, source="gemini:fake", prompt_version="t", status="ok",
                             label=sample.label, explanation=f"The person shows {sample.label}."))
    return export_dataset(name, out=root / "exports", include_suggestions=True, url=url).id


def wait_for(job_id: int, url: str, until, timeout: float = 240.0, poll: float = 0.5) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = finetune.job_status(job_id, url)
        if until(status, finetune.read_events(job_id, url=url)):
            return status
        time.sleep(poll)
    raise AssertionError(f"job {job_id} did not get there: {finetune.job_status(job_id, url)}\n"
                         f"{(finetune.job_dir(job_id) / 'process.log').read_text()[-3000:]}")


def kill_past_a_checkpoint(job_id: int, url: str) -> None:
    """SIGKILL the trainer at a moment when it has logged a step past its newest checkpoint
    (a kill by the clock alone sometimes landed right after a checkpoint, leaving no lost step
    to compare): frozen with SIGSTOP, its log and checkpoint pointer hold still to be read; if
    it froze right on a checkpoint, it runs on a little and is frozen again."""
    pid = finetune.job_status(job_id, url)["pid"]
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        newest = latest_checkpoint(finetune.job_dir(job_id))
        saved = int(newest.name.split("-")[1]) if newest else 0
        if any(e["event"] == "step" and e["step"] > saved for e in finetune.read_events(job_id, url=url)):
            os.kill(pid, signal.SIGKILL)  # a stopped process dies of it too
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the trainer never logged a step past its newest checkpoint")


def finished(status: dict, events: list[dict]) -> bool:
    return status["status"] in ("succeeded", "failed", "cancelled")


@pytest.fixture()
def store(tmp_path, monkeypatch, tiny_checkpoint):  # noqa: F811
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    init_db(url)
    register_version("base", tiny_checkpoint, is_tiny=True, published=True, serving=True, url=url)
    return tmp_path, url


def test_finetune_improves_survives_a_kill_publishes_and_is_served(store, tiny_checkpoint):  # noqa: F811
    root, url = store
    snapshot = colour_dataset(root, url, "colours")
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=1, max_new_tokens=4))
    set_shared_engine(engine)
    watching = threading.Event()
    try:
        # Without the feature cache: cached epochs run so fast that the kill below would land
        # past the last checkpoint (the cache's own equality test is in test_model_training.py).
        job = finetune.start_job(snapshot, options={**OPTIONS, "feature_cache": False}, url=url)
        with pytest.raises(UserError, match="one job trains at a time"):
            finetune.start_job(snapshot, options=OPTIONS, url=url)
        # Kill the trainer (no clean stop) a step after its first checkpoint ...
        wait_for(job, url, lambda s, ev: any(e["event"] == "step" and e["step"] > 6 for e in ev), poll=0.05)
        kill_past_a_checkpoint(job, url)
        dead = wait_for(job, url, lambda s, ev: s["status"] != "running")
        assert dead["status"] == "failed" and "ended without finishing" in dead["error"]
        before_kill = finetune.read_events(job, url=url)
        logged = max(e["step"] for e in before_kill if e["event"] == "checkpoint")
        # ... then resume: it continues from the newest checkpoint, with the same data and state.
        finetune.resume_job(job, url)
        done = wait_for(job, url, finished)
        events = finetune.read_events(job, url=url)
        assert done["status"] == "succeeded", done
        starts = [e for e in events if e["event"] == "start"]
        # The checkpoint's pointer switches before its log line: a kill between the two resumes
        # from the newer checkpoint than the log names (one interval later), never an older one.
        checkpoint = starts[1]["resumed_from"]
        assert len(starts) == 2 and checkpoint in (logged, logged + OPTIONS["checkpoint_every"])
        lost = {e["step"]: e["loss"] for e in before_kill if e["event"] == "step" and e["step"] > checkpoint}
        assert lost, "the kill came before any step past the checkpoint"
        again = [e for e in events[len(before_kill):] if e["event"] == "step"]
        assert again[0]["step"] == checkpoint + 1 and again[-1]["step"] == starts[0]["total_steps"]
        for e in again:  # the lost steps done over: same weights, batches and RNG, same losses
            if e["step"] in lost:
                assert e["loss"] == lost[e["step"]]
        # The fine-tune learnt the colours: UAR well above the guessing parent, so it was published.
        evaluation = next(e for e in events if e["event"] == "eval")
        assert evaluation["uar"] > evaluation["parent_uar"] and evaluation["uar"] >= 0.8
        assert os.path.exists(evaluation["confusion_png"])
        version = find_version(done["version"], url)
        assert version["published"] and version["is_serving"] and version["parent"] == "base"
        assert version["metrics"]["colours/test"]["uar"] == evaluation["uar"]
        assert serving_version(url)["name"] == done["version"]
        assert (root / "data" / "models" / done["version"] / "adapter").is_dir()
        assert not list((root / "data" / "models").glob(".tmp-*"))
        # Reading the job's status changed nothing; the app process's registry watcher notices
        # the published version and hot-swaps its engine; a rollback swaps it back.
        assert engine.serving.name == "tiny-base"
        from webapp.app import follow_registry

        follow_registry("base", interval_s=0.1, stop=watching)
        deadline = time.time() + 60
        while engine.serving.name != done["version"] and time.time() < deadline:
            time.sleep(0.1)
        assert engine.info["model_version"] == f"tiny-test-fixture:{done['version']}"
        rollback("base", url=url)
        assert engine.info["model_version"] == "tiny-test-fixture:base"
    finally:
        watching.set()
        set_shared_engine(None)
        engine.close()


def test_a_regressing_finetune_is_not_published(store):
    root, url = store
    good = colour_dataset(root, url, "colours")
    first = wait_for(finetune.start_job(good, options=OPTIONS, url=url), url, finished)
    assert first["status"] == "succeeded" and first["published"]
    wrong = colour_dataset(root, url, "colours-mislabelled", wrong_train_labels=True)
    job = finetune.start_job(wrong, options={**OPTIONS, "epochs": 3, "name": "mislabelled"}, url=url)
    second = wait_for(job, url, finished)
    assert second["status"] == "succeeded" and second["published"] is False
    assert second["version"] == "mislabelled"
    gate = next(e for e in finetune.read_events(job, url=url) if e["event"] == "done")["gate"]
    assert "dropped below parent" in gate
    assert serving_version(url)["name"] == first["version"]
    assert not find_version("mislabelled", url)["published"]
    with pytest.raises(UserError, match="never published"):
        rollback("mislabelled", url=url)


def test_cancel_stops_cleanly_with_a_resumable_checkpoint(store):
    root, url = store
    snapshot = colour_dataset(root, url, "colours")
    job = finetune.start_job(snapshot, options={**OPTIONS, "epochs": 50, "checkpoint_every": 1000}, url=url)
    wait_for(job, url, lambda s, ev: any(e["event"] == "step" for e in ev))
    finetune.cancel_job(job, url)
    status = wait_for(job, url, lambda s, ev: s["status"] != "running")
    assert status["status"] == "cancelled"
    cancelled = next(e for e in finetune.read_events(job, url=url) if e["event"] == "cancelled")
    assert (finetune.job_dir(job) / "latest").read_text() == f"checkpoint-{cancelled['step']}"
    assert (finetune.job_dir(job) / f"checkpoint-{cancelled['step']}" / "trainable.safetensors").exists()
    assert finetune.list_jobs(url)[0]["id"] == job
    with pytest.raises(UserError, match="not running"):
        finetune.cancel_job(job, url)


def test_evaluation_scores_explanations_against_accepted_corrections(store, tiny_checkpoint, fast_passwords):  # noqa: F811
    from annotation import workflow
    from annotation.users import add_user

    root, url = store
    colour_dataset(root, url, "colours")
    add_user("ana", "annotator", "pw-ana-123456", url=url)
    add_user("rev", "reviewer", "pw-rev-123456", url=url)
    with session_scope(url) as s:
        sample_id = s.query(Sample.id).filter_by(split="test").order_by(Sample.id).first()[0]
    saved = workflow.save("ana", sample_id, "happiness", "The cheeks are raised.", status="submitted",
                          expected_version=0, url=url)
    workflow.review("rev", saved["response_id"], "accepted", url=url)
    result = evaluate_version("base", "colours", "test", url=url, num_frames=1)
    assert result["n"] == 9 and result["rouge_l_n"] == 1
    # ROUGE-L of the explanation the serving engine gives for that sample, asked as evaluated.
    engine = Engine(str(tiny_checkpoint), EngineConfig(num_frames=1))
    try:
        explanation = engine.predict(workflow.sample_media(sample_id, url)[0])["explanation"]
    finally:
        engine.close()
    assert result["rouge_l"] == pytest.approx(rouge_l(explanation, "The cheeks are raised."))
    assert sum(map(sum, result["confusion"])) == 9 and result["labels"][0] == "neutral"
    stored = find_version("base", url)["metrics"]["colours/test"]
    assert stored["uar"] == result["uar"] and stored["samples"] == result["samples"]
    with pytest.raises(UserError, match="no labelled samples"):
        evaluate_version("base", "colours", "val", url=url)


# ---------------------------------------------------------------- no model needed below

def test_replay_mixes_earlier_records_fresh_each_epoch_in_a_fixed_order(tmp_path):
    import json

    def snapshot(name: str, ids: list[str]):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"id": i, "image": f"{i}.png", "split": "train", "conversations": []} for i in ids]
        rows.append({"id": "held-out", "image": "t.png", "split": "test", "conversations": []})
        (folder / "instructions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return folder

    new = snapshot("new", [f"n{i}" for i in range(10)] + ["shared"])
    old = snapshot("old", [f"o{i}" for i in range(20)] + ["shared"])
    data = load_training_data(new, [old], replay_ratio=0.5, seed=3)
    assert len(data.records) == 11 and len(data.earlier) == 20   # "shared": the newer answer wins
    assert data.replay_per_epoch == 6 and len(data) == 17
    first, second = data.epoch(0), data.epoch(1)
    assert sorted(r["id"] for r in first if r["id"].startswith("n")) == sorted(f"n{i}" for i in range(10))
    assert sum(r["id"].startswith("o") for r in first) == 6
    assert {r["id"] for r in first} != {r["id"] for r in second}          # a fresh replay draw
    assert [r["id"] for r in TrainingData(data.records, data.earlier, 0.5, 3).epoch(1)] == \
        [r["id"] for r in second]                                         # a pure function of (seed, epoch)
    assert TrainingData(data.records, data.earlier, 0.0, 3).replay_per_epoch == 0
    # Steps of an epoch: the last one is short with one process, padded with several.
    items = list(range(10))
    assert step_samples(items, 2, 4, world=1) == [8, 9]
    assert step_samples(items, 2, 4, world=2) == [8, 9, 0, 1]


def test_options_are_checked_before_anything_starts(store):
    root, url = store
    with pytest.raises(UserError, match="unknown fine-tune options: colour"):
        finetune.start_job(1, options={"colour": "red"}, url=url)
    with pytest.raises(UserError, match="epochs must be at least 1"):
        finetune.start_job(1, options={"epochs": 0}, url=url)
    with pytest.raises(UserError, match="version name"):
        finetune.start_job(1, options={"name": "../escape"}, url=url)
    with pytest.raises(UserError, match="exists already"):
        finetune.start_job(1, options={"name": "base"}, url=url)
    with pytest.raises(UserError, match="no model version named 'nope'"):
        finetune.start_job(1, from_version="nope", url=url)
    with pytest.raises(UserError, match="no export snapshot '7'"):
        finetune.start_job(7, url=url)
    assert finetune.list_jobs(url) == []
    assert finetune.TrainOptions.from_dict({"epochs": 3.0, "lr": "0.001"}).epochs == 3


def test_jobs_whose_process_is_gone_are_settled_from_their_log(store):
    import json
    from datetime import datetime, timedelta, timezone

    root, url = store
    dead_pid = 2 ** 22 + 17  # above pid_max on stock kernels: no such process
    with session_scope(url) as s:
        jobs = [FinetuneJob(status="running", pid=dead_pid, config={}),
                FinetuneJob(status="running", pid=dead_pid, config={}),
                FinetuneJob(status="queued", pid=None, config={},
                            created_at=datetime.now(timezone.utc) - timedelta(hours=1))]
        s.add_all(jobs)
        s.flush()
        ids = [j.id for j in jobs]
        for j in jobs:
            j.log_path = str(finetune.job_dir(j.id) / "events.jsonl")
    # Job 1 finished (its process exited before the app saw it); job 2 was killed mid-way.
    (finetune.job_dir(ids[0]) / "events.jsonl").write_text(
        json.dumps({"event": "done", "version": "v1", "published": False, "metrics": {"uar": 0.5}}) + "\n")
    (finetune.job_dir(ids[1]) / "events.jsonl").write_text(
        json.dumps({"event": "step", "step": 3, "total_steps": 9, "loss": 1.0}) + "\n{\"event\": \"st")
    settled = {s["id"]: s for s in finetune.recover_jobs(url)}
    assert settled[ids[0]]["status"] == "succeeded" and settled[ids[0]]["metrics"] == {"uar": 0.5}
    assert settled[ids[1]]["status"] == "failed" and settled[ids[1]]["step"] == 3
    assert f"--resume {ids[1]}" in settled[ids[1]]["error"]
    assert settled[ids[2]]["status"] == "failed"
    assert finetune.recover_jobs(url) == []      # nothing is left queued or running


def test_feature_cache_and_loader_workers_train_exactly_as_the_plain_path(store):
    """The feature cache (prepared samples + frozen vision features kept from epoch 1) and
    DataLoader workers change where the work happens, not what is learnt: the same losses step
    for step as a job that prepares everything in the trainer every epoch."""
    root, url = store
    snapshot = colour_dataset(root, url, "colours")
    options = {**OPTIONS, "epochs": 2, "checkpoint_every": 1000}
    runs = {}
    for name, extra in (("cached", {}), ("plain", {"feature_cache": False, "num_workers": 2})):
        job = finetune.start_job(snapshot, from_version="base", options={**options, **extra, "name": name}, url=url)
        assert wait_for(job, url, finished)["status"] == "succeeded"
        events = finetune.read_events(job, url=url)
        runs[name] = [e for e in events if e["event"] == "step"]
        samples = next(e for e in events if e["event"] == "start")["samples"]
    assert [e["loss"] for e in runs["cached"]] == [e["loss"] for e in runs["plain"]]
    assert {e["epoch"] for e in runs["cached"]} == {0, 1}
    # Every train sample is cached during epoch 1, so epoch 2 prepares nothing.
    assert all(e["cached_samples"] == samples for e in runs["cached"] if e["epoch"] == 1)
    assert {e["cached_samples"] for e in runs["plain"]} == {0}
