"""Database engine, sessions and schema upgrades.

    from db.session import init_db, session_scope
    init_db()                          # alembic upgrade head (the app does this on start)
    with session_scope() as s:         # a new Session per request/job; commit on success
        s.add(...)

URL: EMO_DB_URL (any SQLAlchemy URL; PostgreSQL for many annotators), default a SQLite file
under EMO_DATA_DIR (./data). SQLite runs in WAL mode with a busy timeout and foreign keys on.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000

log = logging.getLogger(__name__)
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def data_dir() -> Path:
    path = Path(os.environ.get("EMO_DATA_DIR", "data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    return os.environ.get("EMO_DB_URL") or f"sqlite:///{data_dir() / 'emo_studio.db'}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def get_engine(url: str | None = None) -> Engine:
    """One Engine (connection pool) per URL per process."""
    url = url or database_url()
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite"):
                database = sqlite_path(url)
                if database is not None:
                    database.parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                          "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return _engines[url]


def sqlite_path(url: str | None = None) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url or database_url())
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def dispose_engine(url: str | None = None) -> None:
    """Close the pooled connections of one URL's engine and forget it (tests, backups)."""
    with _lock:
        engine = _engines.pop(url or database_url(), None)
    if engine is not None:
        engine.dispose()


def alembic_config(url: str | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def init_db(url: str | None = None) -> None:
    """Bring the schema to the newest migration (safe to call on every start)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every start are noise
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config(url)
    head = ScriptDirectory.from_config(config).get_current_head()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return  # the common case on start: nothing to do
    log.info("upgrading the database schema from %s to %s", current or "empty", head)
    command.upgrade(config, "head")


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A fresh Session for one unit of work: committed on success, rolled back on error."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def backup(out: str | os.PathLike, url: str | None = None) -> Path:
    """Copy the SQLite store with SQLite's online backup API (safe while the app writes).

    `out`: a file path, or a folder (existing, or written with a trailing "/"), where the copy is
    named emo_studio-<UTC time>.db.
    The copy is written beside its target, checked with `PRAGMA integrity_check`, then renamed.
    """
    import sqlite3
    from datetime import datetime, timezone

    from core.errors import UserError

    source = sqlite_path(url)
    if source is None:
        raise UserError("backup copies a SQLite store; for another database use its own tool "
                        "(e.g. pg_dump for PostgreSQL)")
    if not source.exists():
        raise UserError(f"{source}: no database file to back up")
    target = Path(out).expanduser()
    if str(out).endswith(("/", os.sep)):  # "backups/" names a folder even before it exists
        target.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        target = target / f"{source.stem}-{stamp}.db"
    if target.exists():
        raise UserError(f"{target} exists; choose a new file name")
    if target.resolve() == source.resolve():
        raise UserError("the backup cannot overwrite the database itself")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(partial)
    try:
        # Page steps let writers in between; the API restarts a step a writer interfered with.
        src.backup(dst, pages=1024)
        dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file, no -wal
        status = dst.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        dst.close()
        src.close()
    if status != "ok":
        partial.unlink(missing_ok=True)
        raise UserError(f"the backup failed its integrity check ({status}); nothing was written")
    os.replace(partial, target)
    return target.resolve()
