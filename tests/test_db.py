"""The store itself: migrations, SQLite settings, sessions, users, backups (real SQLite files)."""
from __future__ import annotations

import io
import json
import sqlite3
import threading

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from annotation import users
from core.errors import UserError
from db.models import Dataset, Sample, User
from db.session import (alembic_config, backup, database_url, dispose_engine, get_engine, init_db,
                        session_scope)

# Each test that uses db_url runs on SQLite and on a real PostgreSQL (tests/conftest.py), but
# for the ones marked store_backends("sqlite"): SQLite's settings and its backup.
STORE_BACKENDS = ("sqlite", "postgresql")
HEAD = "0005"


def test_migrations_upgrade_from_empty_and_downgrade_one_step(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = get_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert {"users", "datasets", "samples", "suggestions", "responses", "response_history",
            "claims", "reviews", "export_snapshots", "finetune_jobs", "model_versions",
            "preferences", "explain_cache", "alembic_version"} <= tables
    assert "response_version" in {c["name"] for c in inspect(engine).get_columns("reviews")}

    with session_scope(url) as s:   # data survives the round trip
        s.add(Dataset(name="d", modality="image", label_set=["happiness"], source_format="csv", root="/"))
    command.downgrade(config, "0002")
    assert "response_version" not in {c["name"] for c in inspect(engine).get_columns("reviews")}
    assert "gemini_batches" not in inspect(engine).get_table_names()
    with engine.connect() as c:
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == "0002"
    init_db(url)                    # what the app does on start: back to head
    with engine.connect() as c:
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
        assert c.scalar(text("SELECT name FROM datasets")) == "d"
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    dispose_engine(url)


def test_migrations_round_trip_on_postgresql(postgres):
    """Every revision up and down on a real PostgreSQL, from an empty database."""
    url = postgres.new_database(migrated=False)
    try:
        config = alembic_config(url)
        init_db(url)
        engine = get_engine(url)
        assert {"gemini_batches", "reviews", "claims"} <= set(inspect(engine).get_table_names())
        with session_scope(url) as s:
            s.add(Dataset(name="d", modality="image", label_set=["happiness"],
                          source_format="csv", root="/"))
        command.downgrade(config, "0001")
        assert "gemini_batches" not in inspect(engine).get_table_names()
        command.upgrade(config, "head")
        with engine.connect() as c:
            assert c.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
            assert c.scalar(text("SELECT name FROM datasets")) == "d"
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        dispose_engine(url)
        postgres.drop(url)


def test_migrations_match_the_models(db_url):
    """`alembic check`: autogenerate finds nothing between head and db/models.py."""
    command.check(alembic_config(db_url))


def test_foreign_keys_are_enforced(db_url):
    with pytest.raises(IntegrityError):
        with session_scope(db_url) as s:
            s.add(Sample(dataset_id=999, media_path="/x", content_hash="0" * 64, modality="image",
                         split="train", meta={}))


@pytest.mark.store_backends("sqlite")
def test_sqlite_settings_and_constraints(db_url):
    with get_engine(db_url).connect() as c:
        assert c.scalar(text("PRAGMA journal_mode")) == "wal"
        assert c.scalar(text("PRAGMA foreign_keys")) == 1
        assert c.scalar(text("PRAGMA busy_timeout")) >= 5000
    with pytest.raises(IntegrityError):   # foreign keys are enforced
        with session_scope(db_url) as s:
            s.add(Sample(dataset_id=999, media_path="/x", content_hash="0" * 64, modality="image",
                         split="train", meta={}))


def test_session_scope_commits_or_rolls_back(db_url):
    with pytest.raises(RuntimeError):
        with session_scope(db_url) as s:
            s.add(Dataset(name="gone", modality="image", label_set=[], source_format="csv", root="/"))
            s.flush()
            raise RuntimeError("boom")
    with session_scope(db_url) as s:
        assert s.scalars(select(Dataset)).all() == []
        s.add(Dataset(name="kept", modality="image", label_set=[], source_format="csv", root="/"))
    with session_scope(db_url) as s:
        assert s.scalars(select(Dataset.name)).all() == ["kept"]


def test_default_url_lives_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("EMO_DB_URL", raising=False)
    monkeypatch.setenv("EMO_DATA_DIR", str(tmp_path / "data"))
    assert database_url() == f"sqlite:///{tmp_path / 'data' / 'emo_studio.db'}"
    assert (tmp_path / "data").is_dir()
    # A bare PostgreSQL URL means the psycopg 3 driver we ship (SQLAlchemy would look for psycopg2).
    for given in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        monkeypatch.setenv("EMO_DB_URL", given)
        assert database_url() == "postgresql+psycopg://u@h/db"


def test_users_argon2_roles_and_authentication(db_url, fast_passwords):
    user = users.add_user("ana", "annotator", "long-enough", url=db_url)
    assert user["role"] == "annotator"
    with session_scope(db_url) as s:
        stored = s.scalars(select(User.password_hash).where(User.name == "ana")).one()
    assert stored.startswith("$argon2") and "long-enough" not in stored
    assert users.authenticate("ana", "long-enough", url=db_url).name == "ana"
    assert users.authenticate("ana", "wrong-password", url=db_url) is None
    assert users.authenticate("nobody", "long-enough", url=db_url) is None
    with pytest.raises(UserError, match="already exists"):
        users.add_user("ana", "viewer", "long-enough", url=db_url)
    with pytest.raises(UserError, match="role"):
        users.add_user("bob", "boss", "long-enough", url=db_url)
    with pytest.raises(UserError, match="at least"):
        users.add_user("bob", "viewer", "short", url=db_url)
    with pytest.raises(UserError, match="user name"):
        users.add_user("bad name", "viewer", "long-enough", url=db_url)
    users.set_role("ana", "reviewer", url=db_url)
    users.set_password("ana", "another-secret", url=db_url)
    assert users.authenticate("ana", "long-enough", url=db_url) is None
    assert users.authenticate("ana", "another-secret", url=db_url).role == "reviewer"
    assert [u["name"] for u in users.list_users(url=db_url)] == ["ana"]
    users.set_role("ana", "admin", url=db_url)
    with pytest.raises(UserError, match="only admin"):   # nobody could manage users after it
        users.set_role("ana", "annotator", url=db_url)
    users.add_user("bea", "admin", "long-enough", url=db_url)
    assert users.set_role("ana", "annotator", url=db_url)["role"] == "annotator"


@pytest.mark.store_backends("sqlite")
def test_users_and_backup_commands(db_url, tmp_path, monkeypatch, capsys, fast_passwords):
    import app

    monkeypatch.setenv("EMO_DB_URL", db_url)
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pass\n"))
    assert app.main(["users", "add", "ana", "--role", "annotator", "--password-stdin"]) == 0
    assert "added ana (annotator)" in capsys.readouterr().out
    assert app.main(["users", "list", "--json"]) == 0
    assert [u["name"] for u in json.loads(capsys.readouterr().out)] == ["ana"]
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-pass\n"))
    assert app.main(["users", "add", "ana", "--role", "viewer", "--password-stdin"]) == 2
    assert capsys.readouterr().err.strip() == "error: user ana already exists"

    assert app.main(["backup", str(tmp_path), "--json"]) == 0
    copy = json.loads(capsys.readouterr().out)["path"]
    with sqlite3.connect(copy) as c:
        assert c.execute("SELECT name FROM users").fetchall() == [("ana",)]
    assert app.main(["backup", str(tmp_path / "new-folder") + "/"]) == 0   # a folder, made on demand
    assert len(list((tmp_path / "new-folder").glob("store-*.db"))) == 1
    capsys.readouterr()
    assert app.main(["backup", copy]) == 2
    assert "exists" in capsys.readouterr().err
    monkeypatch.setenv("EMO_DB_URL", "postgresql://u@localhost/none")
    with pytest.raises(UserError, match="pg_dump"):
        backup(tmp_path / "x.db")


@pytest.mark.store_backends("sqlite")
def test_online_backup_while_writing(db_url, tmp_path):
    """A writer keeps committing while the backup runs: the copy is consistent and complete up
    to some commit."""
    with session_scope(db_url) as s:
        s.add(Dataset(name="d", modality="image", label_set=[], source_format="csv", root="/"))
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set() or i < 50:
            with session_scope(db_url) as s:
                s.add(Sample(dataset_id=1, media_path=f"/m/{i}", content_hash=f"{i:064d}",
                             modality="image", split="train", meta={"i": i}))
            written.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    copies = [backup(tmp_path / f"copy{n}.db", url=db_url) for n in range(3)]
    stop.set()
    thread.join()
    for copy in copies:
        with sqlite3.connect(copy) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = c.execute("SELECT count(*) FROM samples").fetchone()[0]
            ids = [row[0] for row in c.execute("SELECT meta FROM samples ORDER BY id")]
        assert n <= len(written) and [json.loads(m)["i"] for m in ids] == list(range(n))
