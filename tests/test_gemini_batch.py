"""Gemini's Batch API (`python app.py generate --batch`) against the fake server, real SDK.

Files are uploaded with google-genai's resumable upload, jobs created, polled, listed and
cancelled, result files downloaded: all over HTTP to tests/fake_gemini.py, which checks each
batch line as it checks an online request. The kill tests run the real CLI in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

import app
from annotation.gemini import PROMPT_VERSION, run_generation
from annotation.gemini import batch as gemini_batch
from annotation.gemini.batch import estimate_batch_cost, list_batches, run_batch
from annotation.gemini.settings import estimate_cost
from db.models import GeminiBatch
from db.session import init_db, session_scope
from tests.fake_gemini import FakeGemini
from tests.test_gemini_job import KEY, ROOT, make_dataset, suggestions

FAST_POLL = 0.05


@pytest.fixture
def env(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'store.db'}"
    init_db(url)
    with FakeGemini(api_key=KEY) as fake:
        fake.batch_polls = 2
        monkeypatch.setenv("EMO_DB_URL", url)
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        monkeypatch.setenv("GEMINI_BASE_URL", fake.url)
        monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
        monkeypatch.delenv("GEMINI_MODEL", raising=False)
        yield fake, url


def batch_rows(url: str) -> list[GeminiBatch]:
    with session_scope(url) as session:
        return list(session.scalars(select(GeminiBatch).order_by(GeminiBatch.id)))


def cli(url: str, fake: FakeGemini, *args: str) -> list[str]:
    return [sys.executable, "app.py", "generate", *args]


def child_env(url: str, fake: FakeGemini) -> dict:
    return {**os.environ, "EMO_DB_URL": url, "GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": fake.url}


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None:
            assert process.poll() is None, f"the CLI exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ the whole path

def test_fifty_samples_survive_a_kill_mid_poll_and_cost_nothing_twice(env, tmp_path):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "big", 50)
    command = cli(url, fake, "--dataset", "big", "--batch", "--poll", str(FAST_POLL), "--json")
    fake.batch_hold.set()       # the job stays RUNNING while the first CLI polls it

    first = subprocess.Popen(command, cwd=ROOT, env=child_env(url, fake),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: fake.batch_calls["get"] >= 3, "a few polls", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    [row] = batch_rows(url)
    assert row.name in fake.batches and row.state == "JOB_STATE_RUNNING"
    assert row.requests == 50 and row.ingested_at is None and row.estimated_tokens > 50 * 258
    assert suggestions(url) == {}

    # While the batch is open, an online run leaves its samples alone (they would cost twice).
    online = run_generation("big", timeout_s=5)
    assert (online["selected"], online["in_batch"]) == (0, 50) and sum(fake.requests.values()) == 0

    fake.batch_hold.clear()
    rerun = subprocess.run(command, cwd=ROOT, env=child_env(url, fake), capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    view = json.loads(rerun.stdout)
    assert view["attached"] is True and view["batch"] == row.name
    assert (view["state"], view["ingested"]) == ("JOB_STATE_SUCCEEDED", True)
    assert (view["ok"], view["rejected"], view["failed"], view["requests"]) == (50, 0, 0, 50)
    assert fake.batch_calls["create"] == 1 and fake.batch_calls["upload"] == 1
    assert fake.batch_calls["download"] == 1 and fake.problems == []

    stored = suggestions(url)
    assert sorted(stored) == sorted(r.sample_id for r in rows)
    by_id = {r.sample_id: r for r in rows}
    for sample_id, found in stored.items():
        [s] = found
        assert (s.status, s.label, s.source, s.prompt_version) == (
            "ok", by_id[sample_id].label, "gemini:gemini-2.5-flash", PROMPT_VERSION)
        assert s.input_tokens > 258 and s.output_tokens > 0
    assert all(fake.batch_paid[r.key] == 1 for r in rows) and sum(fake.paid.values()) == 0
    tokens = (sum(s[0].input_tokens for s in stored.values()),
              sum(s[0].output_tokens for s in stored.values()))
    assert (view["input_tokens"], view["output_tokens"]) == tokens
    assert view["estimated_cost_usd"] == pytest.approx(
        estimate_cost("gemini-2.5-flash", *tokens) / 2, abs=2e-6)

    # Once more: nothing left to ask, nothing submitted, nothing counted again.
    again = subprocess.run(command, cwd=ROOT, env=child_env(url, fake), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["batch"] is None
    assert fake.batch_calls["create"] == 1 and len(batch_rows(url)) == 1
    status = subprocess.run(cli(url, fake, "--dataset", "big", "--batch-status"), cwd=ROOT,
                            env=child_env(url, fake), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "JOB_STATE_SUCCEEDED" in status.stdout and "ok 50" in status.stdout
    assert sum(fake.batch_paid.values()) == 50 and len(suggestions(url)) == 50


def test_a_kill_during_create_reattaches_by_display_name(env, tmp_path):
    """Killed after Google created the job but before the CLI heard of it: the rerun finds the
    job in batches.list by its display name and never creates a second one."""
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "late", 6)
    fake.create_delay_s = 30
    command = cli(url, fake, "--dataset", "late", "--batch", "--poll", str(FAST_POLL), "--json")
    first = subprocess.Popen(command, cwd=ROOT, env=child_env(url, fake),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: fake.batch_calls["create"] == 1, "the create call", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    [row] = batch_rows(url)
    assert (row.state, row.name) == ("SUBMITTING", None) and row.input_file in fake.files

    fake.create_delay_s = 0
    rerun = subprocess.run(command, cwd=ROOT, env=child_env(url, fake), capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    view = json.loads(rerun.stdout)
    assert fake.batch_calls["create"] == 1 and fake.batch_calls["list"] >= 1
    assert fake.batch_calls["upload"] == 1           # the uploaded file was reused
    assert view["batch"] == next(iter(fake.batches)) and view["ok"] == 6
    assert all(fake.batch_paid[r.key] == 1 for r in rows)


# ------------------------------------------------------------------------------ faults

def test_per_request_failures_are_recorded_and_retried_online(env, tmp_path):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "mixed", 8)
    fake.plan(rows[0].key, "500")
    fake.plan(rows[1].key, "503")
    fake.plan(rows[2].key, "wrong_label")
    fake.plan(rows[3].key, "malformed")
    fake.plan(rows[4].key, "safety")
    states = []
    view = run_batch("mixed", poll_s=FAST_POLL, progress=lambda state, v: states.append(state))
    assert states[-1] == "JOB_STATE_SUCCEEDED" and "JOB_STATE_RUNNING" in states
    assert (view["ok"], view["rejected"], view["failed"]) == (3, 3, 2)
    assert view["rejected_by_reason"] == {"wrong_label": 1, "malformed_json": 1, "blocked": 1}
    assert view["failed_by_reason"] == {"batch:13 INTERNAL": 1, "batch:14 UNAVAILABLE": 1}
    [row] = batch_rows(url)
    assert row.failures == {str(rows[0].sample_id): "batch:13 INTERNAL",
                            str(rows[1].sample_id): "batch:14 UNAVAILABLE"}
    stored = suggestions(url)
    assert rows[0].sample_id not in stored and rows[1].sample_id not in stored
    assert stored[rows[2].sample_id][0].reject_reason.startswith("wrong_label")
    assert stored[rows[4].sample_id][0].finish_reason == "SAFETY"
    # Tokens of every answered line are billed, rejected ones too.
    assert view["input_tokens"] == sum(s[0].input_tokens for s in stored.values())

    # The online mode (the default) asks again for exactly the two that failed.
    online = run_generation("mixed", timeout_s=5)
    assert (online["selected"], online["ok"], online["skipped"]) == (2, 2, 6)
    assert sum(fake.paid.values()) == 2 and fake.paid[rows[0].key] == fake.paid[rows[1].key] == 1
    assert len(suggestions(url)) == 8 and fake.problems == []


def test_expired_and_failed_jobs_store_nothing_and_the_next_batch_asks_again(env, tmp_path):
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "slowpoke", 5)
    fake.plan_batch("expire", "fail")
    expired = run_batch("slowpoke", poll_s=FAST_POLL)
    assert (expired["state"], expired["ingested"]) == ("JOB_STATE_EXPIRED", True)
    assert expired["failed_by_reason"] == {"expired": 5} and expired["ok"] == 0
    assert expired["estimated_cost_usd"] == 0 and suggestions(url) == {}
    failed = run_batch("slowpoke", poll_s=FAST_POLL)
    assert failed["state"] == "JOB_STATE_FAILED" and failed["failed_by_reason"] == {"failed": 5}
    assert failed["batch"] != expired["batch"]
    done = run_batch("slowpoke", poll_s=FAST_POLL)
    assert (done["state"], done["ok"]) == ("JOB_STATE_SUCCEEDED", 5)
    assert fake.batch_calls["create"] == 3 and len(suggestions(url)) == 5
    assert all(fake.batch_paid[r.key] == 1 for r in rows)
    assert [b["state"] for b in list_batches("slowpoke", url)] == [
        "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_EXPIRED"]


def test_the_data_tab_lists_batch_jobs_for_admins(env, tmp_path, monkeypatch, fast_passwords):
    from annotation.users import add_user
    from webapp import auth
    from webapp.components import data

    fake, url = env
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMO_SECRET_KEY", "batch-tab-secret-0123456789abcdef")
    auth.reset_secret_cache()
    add_user("ada", "admin", "ada-admin-pass", url=url)
    add_user("ann", "annotator", "ann-annotator-pass", url=url)
    make_dataset(fake, url, tmp_path / "media", "tab", 3)
    fake.batch_hold.set()
    submitted = run_batch("tab", wait=False)
    text, table, jobs = data.batch_jobs(auth.login("ada", "ada-admin-pass"), "tab")
    assert submitted["batch"] in text and "--batch-status" in text and "(open)" in table.iloc[0, 1]
    assert table.iloc[0, 2] == 3 and table.iloc[0, 6] > 0 and jobs[0]["ingested"] is False
    fake.batch_hold.clear()
    run_batch("tab", poll_s=FAST_POLL)
    text, table, _ = data.batch_jobs(auth.login("ada", "ada-admin-pass"), "tab")
    assert table.iloc[0, 1] == "JOB_STATE_SUCCEEDED" and table.iloc[0, 3] == 3
    with pytest.raises(Exception, match="admin"):
        data.batch_jobs(auth.login("ann", "ann-annotator-pass"), "tab")
    auth.reset_secret_cache()


def test_submit_without_waiting_then_status_and_cancel(env, tmp_path, capsys):
    fake, url = env
    make_dataset(fake, url, tmp_path / "media", "cancelme", 4)
    fake.batch_hold.set()
    assert app.main(["generate", "--dataset", "cancelme", "--batch", "--no-wait", "--json"]) == 0
    submitted = json.loads(capsys.readouterr().out)
    assert submitted["state"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert submitted["ingested"] is False and submitted["estimated_input_cost_usd"] > 0
    assert app.main(["generate", "--dataset", "cancelme", "--batch-status"]) == 0
    out = capsys.readouterr().out
    assert "JOB_STATE_RUNNING" in out and "not done yet" in out

    assert app.main(["generate", "--dataset", "cancelme", "--batch-cancel", "--json"]) == 1
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and cancelled["ingested"]
    assert cancelled["failed_by_reason"] == {"cancelled": 4}
    assert fake.batches[cancelled["batch"]]["state"] == "CANCELLED"
    assert fake.batch_calls["cancel"] == 1 and suggestions(url) == {}
    assert app.main(["generate", "--dataset", "cancelme", "--batch-cancel"]) == 2
    assert "no open Gemini batch" in capsys.readouterr().err
    # Cancelled requests are simply asked again by the next run.
    fake.batch_hold.clear()
    assert run_batch("cancelme", poll_s=FAST_POLL)["ok"] == 4


def test_batch_lines_carry_what_online_requests_carry(env, tmp_path, monkeypatch):
    """The same image asked online (one store) and in a batch (another store): the fake saw the
    same prompt, system instruction, schema and output settings both times."""
    fake, url = env
    rows = make_dataset(fake, url, tmp_path / "media", "same", 2)
    run_generation("same", timeout_s=5)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    init_db(other)
    make_dataset(fake, other, tmp_path / "media", "same", 2)  # the same files, hence keys
    run_batch("same", url=other, poll_s=FAST_POLL)
    for row in rows:
        online, batched = fake.facts[row.key]
        assert batched["batch"] and "batch" not in online
        for name in ("prompt", "images", "system", "model", "label"):
            assert online[name] == batched[name]
        for name in ("temperature", "maxOutputTokens", "responseMimeType"):
            assert online["config"][name] == batched["config"][name]
        assert (online["config"]["responseSchema"]["properties"]["label"]["enum"]
                == batched["config"]["responseSchema"]["properties"]["label"]["enum"])


def test_cli_errors_are_one_line(env, tmp_path, capsys, monkeypatch):
    fake, url = env
    make_dataset(fake, url, tmp_path / "media", "errs", 1)
    assert app.main(["generate", "--dataset", "nope", "--batch"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert app.main(["generate", "--dataset", "errs", "--batch-status"]) == 2
    assert "has no Gemini batch" in capsys.readouterr().err
    assert app.main(["generate", "--dataset", "errs", "--no-wait"]) == 2
    assert "--no-wait goes with --batch" in capsys.readouterr().err
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-wrong-key")
    assert app.main(["generate", "--dataset", "errs", "--batch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the API key" in err and "AIza-wrong-key" not in err
    # Nothing reached Google, so nothing is left open: the row of that try is still resumable.
    assert fake.batch_calls["create"] == 0


def test_batch_prices_are_half_the_list_price():
    assert estimate_batch_cost("gemini-2.5-flash", 1_000_000, 1_000_000) == pytest.approx(1.40)
    assert estimate_batch_cost("gemini-9-unknown", 10, 10) is None
    assert gemini_batch.BATCH_PRICE_FACTOR == 0.5
