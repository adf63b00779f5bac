"""Start-up failures of `python app.py` (issue 14.9): each is one `error: ...` line saying what
to do, exit status 2, no traceback, and the port is checked before anything slow loads."""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_LIMIT_S = 180  # a generous bound for a refusal; a real start would hang until killed


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "EMO_DATA_DIR": str(tmp_path / "data"),
                   "GRADIO_ANALYTICS_ENABLED": "False", **env}
    for name in ("EMO_DB_URL", "EMO_LLAMA_MODEL", "EMO_BACKUP_DIR"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run([sys.executable, "app.py", "serve", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=START_LIMIT_S)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_port_in_use_is_refused_before_the_app_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve(tmp_path, "--port", str(port))
    line = _one_error_line(done)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    # Refused before the store is touched (and so before gradio or the model load).
    assert not (tmp_path / "data" / "emo_studio.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_read_only_data_dir_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        probe = data / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if writable:
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 555 does not stop "
                        "this user's writes; test_an_unwritable_data_dir_is_refused_even_for_root "
                        "covers the check with a folder nobody can write")
        line = _one_error_line(_serve(tmp_path, "--port", str(_free_port())))
        assert f"the data folder {data} is not writable" in line and "EMO_DATA_DIR" in line
    finally:
        data.chmod(0o755)


def test_an_unwritable_data_dir_is_refused_even_for_root(tmp_path):
    """A folder no user can create files in, root included: a process's /proc fdinfo folder."""
    line = _one_error_line(_serve(tmp_path, "--port", str(_free_port()),
                                  EMO_DATA_DIR="/proc/self/fdinfo"))
    assert "the data folder /proc/" in line and "is not writable" in line
    assert "EMO_DATA_DIR" in line


def test_the_writable_check_itself_refuses_a_read_only_folder(tmp_path, monkeypatch):
    from core.errors import UserError
    from db.session import check_store_writable

    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "fine"))
    check_store_writable(f"sqlite:///{tmp_path / 'fine' / 'store.db'}")   # writable: passes
    monkeypatch.setenv("EMO_DATA_DIR", "/proc/self/fdinfo")
    with pytest.raises(UserError, match="is not writable"):
        check_store_writable("sqlite:////proc/self/fdinfo/store.db")


def test_tables_without_an_alembic_version_are_refused(tmp_path):
    database = tmp_path / "data" / "emo_studio.db"
    database.parent.mkdir()
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('someone')")
    line = _one_error_line(_serve(tmp_path, "--port", str(_free_port())))
    assert "has tables (users) but no alembic_version record" in line
    assert "EMO_DB_URL" in line
    with sqlite3.connect(database) as db:   # left exactly as it was
        assert db.execute("SELECT name FROM users").fetchall() == [("someone",)]
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone() == (1,)


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    from db.session import dispose_engine, init_db

    database = tmp_path / "data" / "emo_studio.db"
    url = f"sqlite:///{database}"
    init_db(url)
    dispose_engine(url)
    with sqlite3.connect(database) as db:
        db.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    line = _one_error_line(_serve(tmp_path, "--port", str(_free_port())))
    assert "schema revision 0099_from_the_future" in line and "does not know" in line
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == \
            ("0099_from_the_future",)
