"""Shared fixtures: a fresh store per test (SQLite, or PostgreSQL where a test module asks for
it), and a small imported image dataset.

A module that sets `STORE_BACKENDS = ("sqlite", "postgresql")` runs each of its tests that use
`db_url` on both; `@pytest.mark.store_backends("sqlite")` narrows one test. PostgreSQL is a
throwaway server started once per session in a temp dir on 127.0.0.1 (Debian's postgresql:
initdb + pg_ctl, run as the `postgres` user when the tests run as root), or the server at
EMO_TEST_PG_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres) when that is set.
Its tests skip, saying why, only when no server can be started (and fail instead when
EMO_REQUIRE_POSTGRES is set, as .ci/run does).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PG_TEMPLATE = "emo_template"


def pytest_configure(config):
    config.addinivalue_line("markers", "store_backends(*names): the store backends (sqlite, "
                                       "postgresql) a db_url test runs on")


def pytest_generate_tests(metafunc):
    if "db_url" not in metafunc.fixturenames:
        return
    backends = tuple(getattr(metafunc.module, "STORE_BACKENDS", ("sqlite",)))
    marker = metafunc.definition.get_closest_marker("store_backends")
    if marker is not None:
        backends = tuple(marker.args)
    if backends != ("sqlite",):
        metafunc.parametrize("db_url", backends, indirect=True)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None  # the newest installed major version


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server for tests: `new_database()` hands out a fresh, migrated database."""

    def __init__(self, admin_url: str, stop=None):
        self.admin_url = admin_url  # a SQLAlchemy URL to its `postgres` database
        self._stop = stop
        self._template_ready = False

    def _admin(self, *statements: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for statement in statements:
                    connection.execute(text(statement))
        finally:
            engine.dispose()

    def url(self, database: str) -> str:
        from sqlalchemy import make_url

        return make_url(self.admin_url).set(database=database).render_as_string(
            hide_password=False)

    def new_database(self, migrated: bool = True) -> str:
        """CREATE DATABASE from a template migrated once per session (fast), or empty."""
        from db.session import dispose_engine, init_db

        if migrated and not self._template_ready:
            self._admin(f"DROP DATABASE IF EXISTS {PG_TEMPLATE} WITH (FORCE)",
                        f"CREATE DATABASE {PG_TEMPLATE}")
            init_db(self.url(PG_TEMPLATE))
            dispose_engine(self.url(PG_TEMPLATE))  # a template must have no connections
            self._template_ready = True
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {PG_TEMPLATE}" if migrated else ""))
        return self.url(name)

    def drop(self, url: str) -> None:
        from sqlalchemy import make_url

        self._admin(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()


def _start_postgres() -> PostgresServer:
    """initdb + pg_ctl start into a temp dir; raises RuntimeError saying why it could not."""
    try:
        import psycopg  # noqa: F401  (the driver: psycopg[binary] in requirements.txt)
    except ImportError:
        raise RuntimeError("the psycopg driver is not installed (pip install 'psycopg[binary]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin "
                           "(apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="emo-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if not runuser:
            raise RuntimeError("running as root without runuser to start PostgreSQL as postgres")
        as_user = [runuser, "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    port = _free_port()
    data, log = root / "data", root / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")

    try:
        run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--no-sync", "--locale=C")
        # Durability off: a throwaway server; fsync on every commit only slows the tests.
        run(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200", "start")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(str(exc)) from None

    def stop() -> None:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    return PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (see the module docstring); skips when there is none."""
    external = os.environ.get("EMO_TEST_PG_URL", "").strip()
    try:
        server = PostgresServer(external) if external else _start_postgres()
        server._admin("SELECT 1")
    except Exception as exc:  # no server, no driver, no binaries: say which
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = f"no PostgreSQL server could be started ({first_line})"
        if os.environ.get("EMO_REQUIRE_POSTGRES"):  # CI (.ci/run): a skip would hide the gap
            pytest.fail(f"EMO_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    yield server
    server.stop()


@pytest.fixture
def db_url(request, tmp_path):
    """A migrated store: a SQLite file under tmp_path (a real file: WAL and locking as in
    production), or a fresh PostgreSQL database when parametrized with "postgresql"."""
    from db.session import dispose_engine, init_db

    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        server = request.getfixturevalue("postgres")
        url = server.new_database()
        init_db(url)  # at head already (the template): a no-op, as on every app start
        yield url
        dispose_engine(url)
        server.drop(url)
        return
    assert backend == "sqlite", backend
    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url)
    yield url
    dispose_engine(url)


@pytest.fixture
def fast_passwords(monkeypatch):
    """Cheap argon2 parameters: tests create many users; production keeps the library defaults."""
    from argon2 import PasswordHasher

    from annotation import users

    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def write_png(path, seed: int, size: int = 16):
    """A tiny image whose content (hence hash) depends on `seed`."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def small_dataset(db_url, tmp_path):
    """Dataset "faces": 6 PNGs in a folder-per-class layout (train/test), imported; returns its name."""
    from annotation.ingest import import_dataset

    root = tmp_path / "faces"
    for i, (split, label) in enumerate([("train", "happy"), ("train", "sad"), ("train", "angry"),
                                        ("train", "happy"), ("test", "neutral"), ("test", "sad")]):
        write_png(root / split / label / f"{i:03d}.png", seed=i)
    summary = import_dataset("folder", root, "faces", url=db_url, progress=False)
    assert summary.added == 6 and not summary.broken
    return "faces"
