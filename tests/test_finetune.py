"""Corrections -> better model -> serving, end to end on a tiny checkpoint and the real store.

The dataset is learnable: solid-colour images whose colour decides the expression label. The
base tiny checkpoint guesses; a fine-tune on the exported snapshot must raise UAR on the held-out
test split and get published; a job killed mid-way resumes from its checkpoint and finishes; a
fine-tune on wrong labels regresses and is not published; the engine serves the new version.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from annotation import finetune
from annotation.export import export_dataset
from annotation.importers import import_dataset
from annotation.versions import find_version, register_version, serving_version
from core.engine import Engine, EngineConfig, set_shared_engine
from db.models import Sample, Suggestion
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


def wait_for(job_id: int, url: str, until, timeout: float = 240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = finetune.job_status(job_id, url)
        if until(status, finetune.read_events(job_id, url=url)):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there: {finetune.job_status(job_id, url)}\n"
                         f"{(finetune.job_dir(job_id) / 'process.log').read_text()[-3000:]}")


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
    try:
        job = finetune.start_job(snapshot, options=OPTIONS, url=url)
        with pytest.raises(Exception, match="one job at a time"):
            finetune.start_job(snapshot, options=OPTIONS, url=url)
        # Kill the trainer (no clean stop) once it has written a checkpoint ...
        wait_for(job, url, lambda s, ev: any(e["event"] == "checkpoint" for e in ev))
        os.kill(finetune.job_status(job, url)["pid"], signal.SIGKILL)
        dead = wait_for(job, url, lambda s, ev: s["status"] != "running")
        assert dead["status"] == "failed" and "ended without finishing" in dead["error"]
        checkpoint_step = max(e["step"] for e in finetune.read_events(job, url=url) if e["event"] == "checkpoint")
        # ... then resume: it continues from that step and finishes.
        finetune.resume_job(job, url)
        done = wait_for(job, url, lambda s, ev: s["status"] in ("succeeded", "failed"))
        events = finetune.read_events(job, url=url)
        assert done["status"] == "succeeded", done
        starts = [e for e in events if e["event"] == "start"]
        assert len(starts) == 2 and starts[1]["resumed_from"] == checkpoint_step
        steps = [e["step"] for e in events if e["event"] == "step"]
        assert steps[-1] == starts[0]["total_steps"] and min(s for s in steps[steps.index(checkpoint_step + 1):]) == checkpoint_step + 1
        evaluation = next(e for e in events if e["event"] == "eval")
        assert evaluation["uar"] > evaluation["parent_uar"] and evaluation["uar"] >= 0.8
        version = find_version(done["version"], url)
        assert version["published"] and version["is_serving"] and version["parent"] == "base"
        assert serving_version(url)["name"] == done["version"]
        assert (root / "data" / "models" / done["version"] / "config.json").exists()
        assert not list((root / "data" / "models").glob(".tmp-*"))
        # The app side noticed the published version and hot-swapped the engine.
        assert engine.info["model_version"] == f"tiny-test-fixture:{done['version']}"
    finally:
        set_shared_engine(None)
        engine.close()


def test_a_regressing_finetune_is_not_published(store, tiny_checkpoint):  # noqa: F811
    root, url = store
    good = colour_dataset(root, url, "colours")
    job = finetune.start_job(good, options=OPTIONS, url=url)
    first = wait_for(job, url, lambda s, ev: s["status"] in ("succeeded", "failed"))
    assert first["status"] == "succeeded" and first["published"]
    wrong = colour_dataset(root, url, "colours-mislabelled", wrong_train_labels=True)
    job = finetune.start_job(wrong, options=OPTIONS, url=url)
    second = wait_for(job, url, lambda s, ev: s["status"] in ("succeeded", "failed"))
    assert second["status"] == "succeeded" and second["published"] is False
    gate = next(e for e in finetune.read_events(job, url=url) if e["event"] == "done")["gate"]
    assert "dropped below parent" in gate
    assert serving_version(url)["name"] == first["version"]
    assert not find_version(second["version"], url)["published"]


def test_cancel_stops_cleanly_with_a_partial_checkpoint(store):
    root, url = store
    snapshot = colour_dataset(root, url, "colours")
    job = finetune.start_job(snapshot, options={**OPTIONS, "epochs": 50, "checkpoint_every": 1000}, url=url)
    wait_for(job, url, lambda s, ev: any(e["event"] == "step" for e in ev))
    finetune.cancel_job(job, url)
    status = wait_for(job, url, lambda s, ev: s["status"] != "running")
    assert status["status"] == "cancelled"
    assert (finetune.job_dir(job) / "checkpoint" / "state.pt").exists()
    assert finetune.list_jobs(url)[0]["id"] == job
