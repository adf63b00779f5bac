"""Database engine, sessions and schema upgrades.

    from db.session import init_db, session_scope
    init_db()                          # alembic upgrade head (the app does this on start)
    with session_scope() as s:         # a new Session per request/job; commit on success
        s.add(...)

URL: EMO_DB_URL (any SQLAlchemy URL; PostgreSQL for many annotators), default a SQLite file
under EMO_DATA_DIR (./data). SQLite runs in WAL mode with a busy timeout and foreign keys on.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000

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
                database = url.split("///", 1)[-1]
                if database and database != ":memory:":
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                          "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return _engines[url]


def alembic_config(url: str | None = None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or database_url()).replace("%", "%%"))
    return config


def init_db(url: str | None = None) -> None:
    """Bring the schema to the newest migration (safe to call on every start)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


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
