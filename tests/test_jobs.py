"""The job runner (annotation/jobs.py): import / evaluate / export jobs as subprocesses writing
JSONL progress, followed from the database; cancel, a killed process settled after a restart,
and the Jobs API of the launched app (gradio_client)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from annotation import jobs
from core.errors import UserError
from db.models import Dataset, Job, Sample
from db.session import dispose_engine, init_db, session_scope
from tests.media_files import face_photo, write_image
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)
from tests.test_webapp_api import _app_error, fake_gemini_url, studio  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
FER_HEADER = "emotion,pixels,Usage\n"
FER_ROW = "3," + " ".join(["128"] * 2304) + ",Training\n"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("EMO_DB_URL", url)
    init_db(url)
    yield tmp_path, url
    dispose_engine(url)


def faces_folder(root: Path, n_train: int = 3, n_test: int = 2) -> Path:
    photo = face_photo()[:320, 96:416]
    labels = ["happy", "sad", "angry", "neutral"]
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        folder = root / split / labels[i % len(labels)]
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"{i:03d}.png", (photo.astype(int) + i * 7).clip(0, 255).astype("uint8"))
    return root


def wait(job_id: int, url: str, until, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = jobs.job_status(job_id, url)
        if until(status):
            return status
        time.sleep(0.2)
    log = jobs.job_dir(job_id) / "process.log"
    raise AssertionError(f"job {job_id}: {jobs.job_status(job_id, url)}\n"
                         f"{log.read_text()[-3000:] if log.exists() else ''}")


def ended(status: dict) -> bool:
    return status["status"] not in jobs.ACTIVE


def blocked_fer2013(root: Path) -> tuple[Path, threading.Thread, list]:
    """A fer2013 folder whose CSV is a pipe: the job reads the rows the test writes, reports
    progress, then waits for more, so cancel and kill meet a job that is truly mid-import."""
    folder = root / "piped"
    folder.mkdir()
    pipe = folder / "fer2013.csv"
    os.mkfifo(pipe)
    held: list = []

    def feed() -> None:
        writer = open(pipe, "w")   # blocks until the job opens the pipe
        writer.write(FER_HEADER + FER_ROW * 5)
        writer.flush()
        held.append(writer)         # kept open: the reader waits for the next row

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return folder, thread, held


def test_an_import_job_runs_to_done_with_progress_events(store):
    root, url = store
    job_id = jobs.start_job("import", {"fmt": "folder", "path": str(faces_folder(root / "faces")),
                                       "name": "faces"}, url)
    status = wait(job_id, url, ended)
    assert status["status"] == "done", status
    assert status["result"]["added"] == 5 and status["result"]["dataset"] == "faces"
    assert status["done"] == status["total"] == 5
    events = jobs.read_events(job_id, url=url)
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == 5 and progress[-1]["total"] == 5
    with session_scope(url) as s:
        assert s.query(Sample).join(Dataset).filter(Dataset.name == "faces").count() == 5
        row = s.get(Job, job_id)
        assert row.status == "done" and row.finished_at is not None and row.result["added"] == 5

    # The command line follows the same row; a rerun through it adds nothing twice.
    cli = subprocess.run([sys.executable, "-m", "annotation.jobs", "start", "import",
                          json.dumps({"fmt": "folder", "path": str(root / "faces"), "name": "faces"}),
                          "--wait", "--json"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    again = json.loads(cli.stdout)
    assert again["status"] == "done" and again["result"]["added"] == 0 and again["result"]["skipped"] == 5
    listed = subprocess.run([sys.executable, "-m", "annotation.jobs", "list"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert f"job {job_id} (import): done, 5/5" in listed.stdout


def test_a_failing_job_says_why_in_one_line(store):
    root, url = store
    job_id = jobs.start_job("import", {"fmt": "folder", "path": str(root / "nothing-here")}, url)
    status = wait(job_id, url, ended)
    assert status["status"] == "failed" and "no such file or folder" in status["error"]
    assert jobs.read_events(job_id, url=url)[-1]["event"] == "error"
    with pytest.raises(UserError, match="unknown job kind"):
        jobs.start_job("train", {}, url)
    with pytest.raises(UserError, match="needs fmt, path"):
        jobs.start_job("import", {}, url)
    with pytest.raises(UserError, match="unknown import job arguments: colour"):
        jobs.start_job("import", {"fmt": "folder", "path": "x", "colour": "red"}, url)


def test_a_killed_job_is_settled_as_failed_after_a_restart(store):
    root, url = store
    folder, feeder, held = blocked_fer2013(root)
    job_id = jobs.start_job("import", {"fmt": "fer2013", "path": str(folder), "name": "fer"}, url)
    status = wait(job_id, url, lambda s: s["done"] > 0)
    assert status["status"] == "running"
    os.kill(status["pid"], signal.SIGKILL)
    settled = wait(job_id, url, ended, timeout=30)
    assert settled["status"] == "failed" and "ended without finishing" in settled["error"]
    with session_scope(url) as s:   # job_status only reads: the row still says running ...
        assert s.get(Job, job_id).status == "running"
    assert [s["id"] for s in jobs.recover_jobs(url)] == [job_id]   # ... until the app starts
    with session_scope(url) as s:
        row = s.get(Job, job_id)
        assert row.status == "failed" and row.finished_at is not None
    assert jobs.recover_jobs(url) == []
    for writer in held:
        writer.close()


def test_cancel_stops_a_running_job_cleanly(store):
    root, url = store
    folder, feeder, held = blocked_fer2013(root)
    job_id = jobs.start_job("import", {"fmt": "fer2013", "path": str(folder), "name": "fer"}, url)
    status = wait(job_id, url, lambda s: s["done"] > 0)
    cancelled = jobs.cancel_job(job_id, url)
    assert cancelled["status"] == "cancelled" and cancelled["error"] is None
    assert jobs.read_events(job_id, url=url)[-1]["event"] == "cancelled"
    with session_scope(url) as s:
        assert s.get(Job, job_id).status == "cancelled"
    deadline = time.monotonic() + 10
    while jobs._alive(status["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not jobs._alive(status["pid"])
    with pytest.raises(UserError, match="is cancelled, not running"):
        jobs.cancel_job(job_id, url)
    for writer in held:
        writer.close()


def test_the_evaluate_job_gives_the_same_report_as_the_cli(store, tiny_checkpoint):  # noqa: F811
    from annotation.ingest import import_dataset
    from annotation.versions import register_version

    root, url = store
    register_version("base", tiny_checkpoint, is_tiny=True, published=True, serving=True, url=url)
    import_dataset("folder", faces_folder(root / "faces", n_train=2, n_test=3), "faces", url=url,
                   progress=False)
    cli = subprocess.run([sys.executable, "app.py", "evaluate", "--version", "base", "--dataset",
                          "faces", "--split", "test", "--json", "--no-progress"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert cli.returncode == 0, cli.stderr[-2000:]
    expected = json.loads(cli.stdout)
    job_id = jobs.start_job("evaluate", {"version": "base", "dataset": "faces", "split": "test"}, url)
    status = wait(job_id, url, ended, timeout=300)
    assert status["status"] == "done", status
    report = status["result"]
    for key in ("uar", "war", "n", "confusion", "labels", "per_class_recall", "samples", "version"):
        assert report[key] == expected[key], key
    assert status["done"] == status["total"] == 3


def test_an_export_job_writes_the_snapshot(store):
    from annotation.ingest import import_dataset
    from db.models import Suggestion

    root, url = store
    import_dataset("folder", faces_folder(root / "faces"), "faces", url=url, progress=False)
    failed = wait(jobs.start_job("export", {"dataset": "faces"}, url), url, ended)
    assert failed["status"] == "failed" and "no accepted corrections yet" in failed["error"]
    with session_scope(url) as s:
        for sample in s.query(Sample):
            s.add(Suggestion(sample_id=sample.id, source="gemini:fake", prompt_version="t",
                             status="ok", label=sample.label, explanation="Cheeks raised."))
    status = wait(jobs.start_job("export", {"dataset": "faces", "include_suggestions": True}, url),
                  url, ended)
    assert status["status"] == "done", status
    assert status["result"]["n_samples"] == 5
    assert (Path(status["result"]["path"]) / "instructions.jsonl").exists()


# ---------------------------------------------------------------- through the launched app

def test_the_jobs_api_of_the_launched_app(studio):  # noqa: F811
    client = studio.client()
    folder = faces_folder(studio.root / "data" / "imports" / "job-faces")
    for token in (None, studio.token("ann")):
        assert "admin" in _app_error(lambda: client.predict(token, "folder", str(folder), "x",
                                                            api_name="/start_import_job"))
    ada = studio.token("ada")
    # Confined to the import folders, as the Data tab's import is; refused before any process.
    assert "outside the import folders" in _app_error(lambda: client.predict(
        ada, "folder", str(studio.root / "faces"), "stolen", api_name="/start_import_job"))
    job_id = client.predict(ada, "folder", str(folder), "job-faces", api_name="/start_import_job")
    deadline = time.monotonic() + 180
    while True:
        status = client.predict(ada, job_id, api_name="/job_status")
        if status["status"] not in jobs.ACTIVE or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["status"] == "done", status
    assert status["result"]["added"] == 5 and status["done"] == status["total"] == 5
    assert "is done, not running" in _app_error(lambda: client.predict(ada, job_id,
                                                                       api_name="/cancel_job"))
    assert "admin" in _app_error(lambda: client.predict(None, job_id, api_name="/job_status"))
    # The evaluate button is a job now: the same report, and a row in the jobs table.
    summary, recall, *_ = client.predict(ada, "prior-only", "faces", "test",
                                         api_name="/evaluate_version")
    assert "2 samples" in summary
    table, _text = client.predict(ada, api_name="/list_jobs")
    kinds = {(row[1], row[2]) for row in table["data"]}
    assert ("import", "done") in kinds and ("evaluate", "done") in kinds


# A stand-in for the trainer (annotation/train.py) as annotation/finetune.py sees it: a process
# whose command line says "finetune", logging steps, logging "cancelled" on SIGTERM and exiting.
FAKE_TRAINER = """
import json, signal, sys, time
log = sys.argv[1]
def write(event):
    with open(log, "a") as f:
        f.write(json.dumps(event) + "\\n")
def stop(signum, frame):
    write({"event": "cancelled", "step": 3})
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
write({"event": "start", "total_steps": 10})
write({"event": "step", "step": 3, "total_steps": 10, "loss": 1.5})
time.sleep(120)
"""


def test_a_finetune_job_is_listed_followed_and_cancelled_with_the_others(store):
    from db.models import FinetuneJob
    from webapp.components.jobs import jobs_frame

    root, url = store
    import_id = jobs.start_job("import", {"fmt": "folder", "path": str(root / "missing")}, url)
    wait(import_id, url, ended)
    log = root / "ft-events.jsonl"
    trainer = subprocess.Popen([sys.executable, "-c", FAKE_TRAINER, str(log), "finetune"])
    try:
        with session_scope(url) as s:
            row = FinetuneJob(status="running", pid=trainer.pid, log_path=str(log))
            s.add(row)
            s.flush()
            ft = row.id
        deadline = time.monotonic() + 30
        while not (log.exists() and "step" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        listed = jobs.list_all_jobs(url=url)
        assert [(r["ref"], r["kind"]) for r in listed] == [(f"ft-{ft}", "finetune"),
                                                            (str(import_id), "import")]
        assert (listed[0]["status"], listed[0]["done"], listed[0]["total"]) == ("running", 3, 10)
        table = jobs_frame(listed)
        assert list(table.iloc[0, :4]) == [f"ft-{ft}", "finetune", "running", "3/10 (30%)"]
        assert jobs.any_job_status(f"FT-{ft}", url)["status"] == "running"

        # The CLI lists and cancels it like any job; the fake trainer logs "cancelled" on SIGTERM.
        env = {**os.environ, "EMO_DB_URL": url}
        listing = subprocess.run([sys.executable, "-m", "annotation.jobs", "list"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert f"job ft-{ft} (finetune): running, 3/10" in listing.stdout, listing.stderr
        jobs.cancel_any_job(f"ft-{ft}", url)
        trainer.wait(timeout=30)
        status = jobs.any_job_status(f"ft-{ft}", url)   # the process is gone: settled from its log
        assert status["status"] == "cancelled", status
        with pytest.raises(UserError, match="is cancelled, not running"):
            jobs.cancel_any_job(f"ft-{ft}", url)
        for bad in ("ft-", "x", "0", "1.5"):
            with pytest.raises(UserError, match="Enter a job number"):
                jobs.any_job_status(bad, url)
        with pytest.raises(UserError, match="no fine-tune job 99"):
            jobs.any_job_status("ft-99", url)
    finally:
        trainer.kill()
        trainer.wait()


def test_one_evaluation_and_one_gemini_run_per_dataset_at_a_time(store):
    _, url = store
    with session_scope(url) as s:   # as if started a moment ago, its process still coming up
        s.add(Job(kind="evaluate", args={"version": "v1", "dataset": "a"}, status="queued"))
        s.add(Job(kind="generate", args={"dataset": "a"}, status="queued"))
    with pytest.raises(UserError, match="an evaluation is already running"):
        jobs.start_job("table", {"versions": ["v1"], "datasets": ["a"]}, url)
    with pytest.raises(UserError, match="a Gemini run over this dataset is already running"):
        jobs.start_job("generate", {"dataset": "a"}, url)
    other = jobs.start_job("generate", {"dataset": "b"}, url)   # another dataset: it starts
    assert wait(other, url, ended)["status"] == "failed"         # (no dataset b in this store)
