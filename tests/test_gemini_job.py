"""The batch job (`python app.py generate`) against the fake Gemini server, through faults.

Everything goes through the real google-genai SDK over HTTP to tests/fake_gemini.py; the
resume test runs the real CLI in a subprocess and SIGKILLs it mid-way.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import app
from annotation.gemini import PROMPT_VERSION, GeminiError, run_generation
from annotation.gemini.limits import RetryPolicy
from annotation.gemini.media import sample_images
from annotation.gemini.settings import estimate_cost
from db.models import Dataset, Sample, Suggestion
from db.session import init_db, session_scope
from tests.fake_gemini import FakeGemini, image_key

KEY = "AIzaFAKE-job-key-0123456789abcdef"
LABELS = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]
ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)


@dataclass
class Row:
    sample_id: int
    path: Path
    label: str
    key: str          # the fake server's name for this sample's requests


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A fresh store and a fake Gemini server, wired up through the environment."""
    url = f"sqlite:///{tmp_path / 'db' / 'store.db'}"
    init_db(url)
    with FakeGemini(api_key=KEY, slow_s=1.0) as fake:
        monkeypatch.setenv("EMO_DB_URL", url)
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        monkeypatch.setenv("GEMINI_BASE_URL", fake.url)
        monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
        monkeypatch.delenv("GEMINI_MODEL", raising=False)
        yield fake, url


def make_dataset(fake: FakeGemini, url: str, folder: Path, name: str, n: int,
                 unlabelled: int = 0) -> list[Row]:
    """`n` labelled images (+ `unlabelled` without a label) as a dataset; the fake learns
    each sample's ground truth so it can check the prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with session_scope(url) as session:
        dataset = Dataset(name=name, modality="image", label_set=LABELS, source_format="folder",
                          root=str(folder))
        session.add(dataset)
        session.flush()
        for i in range(n + unlabelled):
            rgb = np.random.default_rng(hash(name) % 1000 + i).integers(0, 256, (40, 48, 3),
                                                                        dtype=np.uint8)
            path = folder / f"{name}_{i:03d}.png"
            Image.fromarray(rgb).save(path)
            label = LABELS[i % len(LABELS)] if i < n else None
            sample = Sample(dataset_id=dataset.id, media_path=str(path), content_hash=f"{name}{i}",
                            modality="image", label=label, split="train", meta={})
            session.add(sample)
            session.flush()
            if label:
                key = image_key(sample_images(path, "image")[0])
                fake.expect(key, label)
                rows.append(Row(sample.id, path, label, key))
    return rows


def suggestions(url: str) -> dict[int, list[Suggestion]]:
    with session_scope(url) as session:
        found: dict[int, list[Suggestion]] = {}
        for s in session.scalars(select(Suggestion).order_by(Suggestion.id)):
            found.setdefault(s.sample_id, []).append(s)
        return found


# ------------------------------------------------------------------------------ faults

def test_job_survives_faults_records_rejections_and_resumes(env, tmp_path):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "faults", 11, unlabelled=1)
    plans = {0: ["429", "ok"], 1: ["500", "503", "ok"], 2: ["slow", "ok"],
             3: ["malformed"], 4: ["safety"], 5: ["max_tokens"], 6: ["wrong_label"],
             7: ["prompt_blocked"], 8: ["503", "503", "503"], 9: ["empty_explanation"],
             10: ["ok"]}
    for i, plan in plans.items():
        fake.plan(rows[i].key, *plan)
    seen = []
    summary = run_generation("faults", workers=3, timeout_s=0.5, retry=FAST,
                             progress=lambda done, total, s: seen.append((done, total)))

    assert fake.problems == []
    assert [fake.requests[r.key] for r in rows] == [2, 3, 2, 1, 1, 1, 1, 1, 3, 1, 1]
    retry_at = fake.times[rows[0].key]
    assert retry_at[1] - retry_at[0] >= 0.95  # Retry-After: 1 was honoured
    deadline = time.monotonic() + 3
    while fake.paid[rows[2].key] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the server is still sleeping on the answer the client gave up on
    assert fake.paid[rows[2].key] == 2        # ... which Google would still bill

    stored = suggestions(url)
    by_index = {i: stored.get(r.sample_id, []) for i, r in enumerate(rows)}
    assert all(len(by_index[i]) == 1 for i in range(11) if i != 8)
    assert by_index[8] == []                  # failed to call: nothing stored, retried next run
    for i in (0, 1, 2, 10):
        s = by_index[i][0]
        assert (s.status, s.label, s.category_answer, s.finish_reason) == (
            "ok", rows[i].label, rows[i].label, "STOP")
        assert "AU6" in s.explanation and s.source == "gemini:gemini-2.5-flash"
        assert s.prompt_version == PROMPT_VERSION and s.input_tokens > 258
    expected = {3: ("malformed_json", "STOP"), 4: ("blocked", "SAFETY"),
                5: ("truncated", "MAX_TOKENS"), 6: ("wrong_label", "STOP"),
                7: ("blocked", "PROMPT_SAFETY"), 9: ("empty_explanation", "STOP")}
    for i, (code, finish) in expected.items():
        s = by_index[i][0]
        assert (s.status, s.reject_reason.split(":")[0], s.finish_reason) == ("rejected", code,
                                                                              finish)
    assert by_index[6][0].label == "sadness" and "ground truth" in by_index[6][0].reject_reason

    assert summary["ok"] == 4 and summary["rejected"] == 6 and summary["failed"] == 1
    assert summary["rejected_by_reason"] == {"blocked": 2, "malformed_json": 1, "truncated": 1,
                                             "wrong_label": 1, "empty_explanation": 1}
    assert summary["failed_by_reason"] == {"503 UNAVAILABLE": 1}
    assert summary["unlabelled"] == 1 and summary["selected"] == 11
    assert summary["requests"] == sum(fake.requests.values())
    with session_scope(url) as session:
        tokens = session.execute(select(func.sum(Suggestion.input_tokens),
                                        func.sum(Suggestion.output_tokens))).one()
    assert (summary["input_tokens"], summary["output_tokens"]) == tuple(tokens)
    assert summary["estimated_cost_usd"] == estimate_cost("gemini-2.5-flash", *tokens) > 0
    assert seen[0] == (0, 11) and seen[-1] == (11, 11)

    # A rerun asks only for the sample whose calls failed, and pays for nothing else again.
    before = dict(fake.requests)
    again = run_generation("faults", workers=3, retry=FAST)
    assert (again["skipped"], again["ok"], again["requests"]) == (10, 1, 1)
    assert {k: v for k, v in fake.requests.items() if v != before.get(k)} == {rows[8].key: 4}

    # --retry-rejected asks again where the answer was rejected, replacing those rows.
    redo = run_generation("faults", retry_rejected=True, retry=FAST)
    assert (redo["selected"], redo["ok"], redo["skipped"]) == (6, 6, 5)
    stored = suggestions(url)
    assert all(len(stored[r.sample_id]) == 1 and stored[r.sample_id][0].status == "ok"
               for r in rows)


def test_limit_and_video_samples_with_scene_description(env, tmp_path):
    from tests.media_files import face_frames, write_video

    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "lim", 5)
    summary = run_generation("lim", limit=2, retry=FAST)
    assert (summary["selected"], summary["ok"]) == (2, 2)
    assert sorted(suggestions(url)) == [rows[0].sample_id, rows[1].sample_id]

    clip = write_video(tmp_path / "clip.mp4", face_frames(12))
    with session_scope(url) as session:
        ds = Dataset(name="clips", modality="video", label_set=LABELS, source_format="folder",
                     root=str(tmp_path))
        session.add(ds)
        session.flush()
        session.add(Sample(dataset_id=ds.id, media_path=str(clip), content_hash="clip",
                           modality="video", label="fear", split="test",
                           meta={"description": "A woman walks into a dark room."}))
    key = image_key(sample_images(clip, "video", frames=3)[0])
    fake.expect(key, "fear")
    summary = run_generation("clips", frames=3, retry=FAST)
    assert summary["ok"] == 1 and fake.problems == []
    assert fake.images[key] == [3]
    assert "Scene description: A woman walks into a dark room." in fake.prompts[key][0]
    assert '"fear"' in fake.prompts[key][0] and "3 images" in fake.prompts[key][0]


def test_unreadable_media_fails_that_sample_only(env, tmp_path):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "broken", 3)
    rows[1].path.write_bytes(b"not an image")
    summary = run_generation("broken", retry=FAST)
    assert (summary["ok"], summary["failed_by_reason"]) == (2, {"media": 1})
    assert sum(fake.requests.values()) == 2


# ------------------------------------------------------------------------------ the API key

def test_api_key_never_reaches_logs_errors_output_or_the_database(env, tmp_path, caplog,
                                                                   capsys, monkeypatch):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "secret", 5)
    for row, plan in zip(rows, (["500"], ["wrong_label"], ["malformed"], ["503"] * 3)):
        fake.plan(row.key, *plan)
    caplog.set_level(logging.DEBUG)  # everything: ours, the SDK's, httpx's
    summary = run_generation("secret", retry=FAST)
    assert summary["ok"] == 2 and summary["failed"] == 1
    assert app.main(["generate", "--dataset", "secret", "--json"]) == 0  # the 503 sample again

    wrong = "AIzaWRONG-job-key-fedcba9876543210"
    monkeypatch.setenv("GEMINI_API_KEY", wrong)
    with pytest.raises(GeminiError) as info:  # the two rejected samples are asked again
        run_generation("secret", retry_rejected=True, retry=FAST)
    assert "API key" in str(info.value)
    assert app.main(["generate", "--dataset", "secret", "--retry-rejected"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("error: Gemini refused the API key")

    database_files = list((tmp_path / "db").iterdir())  # the store, its -wal and -shm
    assert any(f.name.endswith("-wal") for f in database_files)
    for secret in (KEY, wrong):
        assert secret not in caplog.text
        assert secret not in out + err
        assert secret not in str(info.value) + json.dumps(summary)
        for f in database_files:
            assert secret.encode() not in f.read_bytes(), f.name
    assert "sample" in caplog.text  # the logs were captured, and they say what happened


# ------------------------------------------------------------------------------ the CLI

def test_cli_prints_a_summary_and_rejects_bad_input(env, tmp_path, capsys, monkeypatch):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "cli", 4)
    rows[3].path.write_bytes(b"")  # an emptied file: that sample fails, the command exits 1
    assert app.main(["generate", "--dataset", "cli", "--limit", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["ok"], summary["selected"], summary["failed"]) == (2, 2, 0)
    assert summary["estimated_cost_usd"] > 0 and "estimate" in summary["cost_note"]

    assert app.main(["generate", "--dataset", "cli"]) == 1
    out = capsys.readouterr().out
    assert "ok 1 · rejected 0 · failed to call 1 · already done 2" in out
    assert "failed: media 1 (run again to retry them)" in out and "estimated cost $" in out

    assert app.main(["generate", "--dataset", "nope"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: unknown dataset 'nope': import it first (python app.py import)"
    with pytest.raises(SystemExit) as info:
        app.main(["generate", "--dataset", "cli", "--workers", "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("GEMINI_API_KEY")
    assert app.main(["generate", "--dataset", "cli"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GEMINI_API_KEY" in err and "GOOGLE_API_KEY" in err


# ------------------------------------------------------------------------------ kill and resume

def test_resume_after_kill_pays_for_nothing_twice(env, tmp_path):
    fake, url = env
    fake.default, fake.slow_s = "slow", 0.3
    rows = make_dataset(fake, url, tmp_path / "media", "killme", 14)
    command = [sys.executable, "app.py", "generate", "--dataset", "killme", "--workers", "2",
               "--json"]
    child_env = {**os.environ, "EMO_DB_URL": url, "GEMINI_API_KEY": KEY,
                 "GEMINI_BASE_URL": fake.url}

    first = subprocess.Popen(command, cwd=ROOT, env=child_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(suggestions(url)) < 4:
        assert first.poll() is None, "the job finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(fake.slow_s + 0.3)  # let the answers that were in flight finish on the server
    done_before = set(suggestions(url))
    paid_before = dict(fake.paid)
    assert 4 <= len(done_before) < len(rows)

    fake.default = "ok"
    rerun = subprocess.run(command, cwd=ROOT, env=child_env, capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["skipped"], summary["ok"]) == (len(done_before), len(rows) - len(done_before))

    stored = suggestions(url)
    assert sorted(stored) == sorted(r.sample_id for r in rows)
    assert all(len(found) == 1 and found[0].status == "ok" for found in stored.values())
    for row in rows:
        if row.sample_id in done_before:  # completed before the kill: never asked again
            assert fake.paid[row.key] == paid_before[row.key] == 1
        else:  # at most the one answer that was in flight when the process died
            assert fake.paid[row.key] <= 2
    assert sum(fake.paid.values()) <= len(rows) + 2  # 2 workers: at most 2 in flight
    assert fake.problems == []
