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
    url = os.environ.get("EMO_DB_URL") or f"sqlite:///{data_dir() / 'emo_studio.db'}"
    # psycopg 3 is the driver we ship; SQLAlchemy reads a bare postgresql:// as psycopg2.
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else url


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

    from alembic.util.exc import CommandError
    from sqlalchemy import inspect
    from sqlalchemy.exc import OperationalError

    from core.errors import UserError

    config = alembic_config(url)
    scripts = ScriptDirectory.from_config(config)
    head = scripts.get_current_head()
    where = _describe(url)
    try:
        with get_engine(url).connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    except OperationalError as exc:
        raise UserError(f"cannot open the database {where} ({_first_line(exc.orig)}): check "
                        "that its folder exists and is writable, or set EMO_DB_URL / "
                        "EMO_DATA_DIR") from None
    if current == head:
        return  # the common case on start: nothing to do
    if current is None and tables:
        # Upgrading would try to create tables that exist: not ours, or its record was lost.
        raise UserError(f"the database {where} has tables ({', '.join(sorted(tables)[:3])}"
                        f"{', ...' if len(tables) > 3 else ''}) but no alembic_version record, "
                        "so its schema version is unknown: point EMO_DB_URL (or EMO_DATA_DIR) "
                        "at a new database, or restore a backup of this app's store")
    if current is not None:
        try:
            known = scripts.get_revision(current) is not None
        except CommandError:
            known = False
        if not known:
            raise UserError(f"the database {where} is at schema revision {current}, which this "
                            f"version of the app does not know (it knows up to {head}): a newer "
                            "release wrote it; run that release, or use a backup from before "
                            "the upgrade")
    log.info("upgrading the database schema from %s to %s", current or "empty", head)
    command.upgrade(config, "head")


def _describe(url: str | None) -> str:
    """The database without credentials: a SQLite file's path, else the URL, password hidden."""
    database = sqlite_path(url)
    if database is not None:
        return str(database)
    return make_url(url or database_url()).render_as_string(hide_password=True)


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def check_store_writable(url: str | None = None) -> None:
    """Refuse to start when the data folder (or the SQLite file's folder) cannot be written.

    Checked with a real file, not permission bits, so it holds for root, read-only mounts and
    ACLs alike; a read-only store otherwise fails later with a traceback from SQLite or the
    secret key. UserError names the folder and what to do.
    """
    import tempfile

    from core.errors import UserError

    def probe(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise UserError(f"the data folder {folder} is not writable ({exc.strerror or exc}): "
                            "make it writable for this user, or point EMO_DATA_DIR (and "
                            "EMO_DB_URL) at a folder that is") from None

    folder = Path(os.environ.get("EMO_DATA_DIR", "data")).resolve()
    probe(folder)  # first: the default database URL is inside it
    database = sqlite_path(url)
    if database is None:
        return
    if database.resolve().parent != folder:
        probe(database.resolve().parent)
    if database.exists() and not os.access(database, os.W_OK):
        raise UserError(f"the database file {database} is read-only: make it writable for "
                        "this user, or point EMO_DB_URL at another store")


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
