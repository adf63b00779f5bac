"""Where an import may read: never the store's own files; in the web app, only the import folders.

    check_import_path("/data/RAF-DB", confined=True)   # the resolved path, or UserError

`confined=True` (the web app) accepts only paths inside `import_roots()` (`EMO_IMPORT_ROOTS`,
default the data dir and `imports/`), symlinks resolved; no import, CLI included, reads the
store's private files (`store_private_paths()`: the database, the secret key, backups).
"""
from __future__ import annotations

import os
from pathlib import Path

from annotation.formats.quoting import quote
from core.errors import UserError

IMPORT_ROOTS_ENV = "EMO_IMPORT_ROOTS"


def import_roots() -> list[Path]:
    """Folders the web app may import from: `EMO_IMPORT_ROOTS` (os.pathsep-separated), by
    default the data dir and `imports/` in the working directory. Symlinks resolved."""
    from db.session import data_dir

    raw = os.environ.get(IMPORT_ROOTS_ENV, "")
    parts = [p.strip() for p in raw.split(os.pathsep) if p.strip()]
    if not parts:
        parts = [str(data_dir()), "imports"]
    return [Path(p).expanduser().resolve() for p in parts]


def store_private_paths(url: str | None = None) -> list[Path]:
    """The store's own files no import may read: the database (and its journal files), the
    session-signing key, backups. A dataset root holds media and label files, never these."""
    from sqlalchemy.engine import make_url

    from db.session import data_dir, database_url

    base = data_dir()
    paths = [base / "secret_key", base / "backups"]
    if os.environ.get("EMO_BACKUP_DIR"):
        paths.append(Path(os.environ["EMO_BACKUP_DIR"]).expanduser())
    try:
        parsed = make_url(url or database_url())
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            db = Path(parsed.database).expanduser()
            paths += [db] + [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
    except Exception:  # an odd URL: the data dir's own files are still protected
        pass
    return [p.resolve() for p in paths]


def inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (both resolved). Strings, not Path.is_relative_to: an
    import checks every file against every root, and this is ten times faster."""
    p, f = str(path), str(folder)
    return p == f or p.startswith(f if f.endswith(os.sep) else f + os.sep)


def check_import_path(path: str | os.PathLike, confined: bool = False,
                      url: str | None = None) -> Path:
    """The resolved dataset path, or UserError if an import may not read it.

    Everyone: not one of the store's private files, inside one, or a folder holding one (the
    data dir itself is not a dataset). `confined` (the web app): inside `import_roots()` too,
    symlinks resolved, so a link in an import folder cannot point outside it.
    """
    shown = quote(path, 120, tail=True)
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        raise UserError(f"{shown}: not a usable path") from None
    for private in store_private_paths(url):
        if inside(resolved, private) or inside(private, resolved):
            raise UserError(f"{shown} is or holds the store's own files (database, "
                            "secret key or backups): import a dataset's folder or file, not the store")
    if confined:
        roots = import_roots()
        if not any(inside(resolved, root) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise UserError(f"{shown} is outside the import folders ({allowed}): copy or link "
                            f"the dataset under one of them, or set {IMPORT_ROOTS_ENV} on the server")
    return resolved
