"""Model versions: a registry of checkpoint folders, the publish gate, rollback, the serving one.

    python app.py versions list
    python app.py versions publish v3        # only if v3's UAR holds up against its parent
    python app.py versions rollback v1

A version is a checkpoint folder under `<data dir>/models/<name>` (written by a fine-tune job
into a temporary folder and renamed into place, so a half-written version never exists) plus a
`ModelVersion` row: parent, snapshot, job, metrics per `dataset/split`, published, serving.
Publishing or rolling back hot-swaps the engine of this process when one is running.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy import select

from core.errors import ModelLoadError, UserError
from db.models import ModelVersion
from db.session import data_dir, session_scope

log = logging.getLogger(__name__)


def models_dir() -> Path:
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_dict(v: ModelVersion, names: dict[int, str]) -> dict:
    return {"name": v.name, "folder": v.folder, "parent": names.get(v.parent_id),
            "snapshot_id": v.snapshot_id, "job_id": v.job_id, "metrics": v.metrics or {},
            "published": v.published, "is_serving": v.is_serving, "is_tiny": v.is_tiny,
            "created_at": v.created_at.isoformat() if v.created_at else None}


def list_versions(url: str | None = None) -> list[dict]:
    with session_scope(url) as s:
        rows = list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        names = {v.id: v.name for v in rows}
        return [_as_dict(v, names) for v in rows]


def find_version(name_or_folder: str, url: str | None = None) -> dict | None:
    for v in list_versions(url):
        if v["name"] == str(name_or_folder) or Path(v["folder"]) == Path(str(name_or_folder)):
            return v
    return None


def version_folder(name_or_folder: str, url: str | None = None) -> str:
    """The checkpoint folder of a registered version, or the argument itself (a folder / hub id,
    or "zero-shot:ID": a released VLM as it is, never a registered version)."""
    from core.model.config import zero_shot_id

    if zero_shot_id(name_or_folder) is not None:
        return str(name_or_folder)
    version = find_version(name_or_folder, url)
    return version["folder"] if version else str(name_or_folder)


def serving_version(url: str | None = None) -> dict | None:
    """The version the registry marks as serving, or None. One small query (the registry is a
    handful of rows): the web process polls it every few seconds to follow publishes and
    rollbacks made by other processes (the CLI, a fine-tune job, another replica)."""
    with session_scope(url) as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.is_serving)
                        .order_by(ModelVersion.id).limit(1)).first()
        if row is None:
            return None
        parent = s.get(ModelVersion, row.parent_id) if row.parent_id else None
        return _as_dict(row, {parent.id: parent.name} if parent else {})


def register_version(name: str, folder: str | Path, parent: str | None = None,
                     snapshot_id: int | None = None, job_id: int | None = None,
                     metrics: dict | None = None, is_tiny: bool = False, published: bool = False,
                     serving: bool = False, url: str | None = None) -> dict:
    with session_scope(url) as s:
        if s.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
            raise UserError(f"a model version named {name!r} exists already")
        parent_row = s.scalar(select(ModelVersion).where(ModelVersion.name == parent)) if parent else None
        if serving:
            for row in s.scalars(select(ModelVersion).where(ModelVersion.is_serving)):
                row.is_serving = False
        s.add(ModelVersion(name=name, folder=str(folder), parent_id=parent_row.id if parent_row else None,
                           snapshot_id=snapshot_id, job_id=job_id, metrics=metrics or {},
                           is_tiny=is_tiny, published=published or serving, is_serving=serving))
    return find_version(name, url)


def ensure_registered(folder: str, url: str | None = None) -> dict:
    """The version row of a checkpoint folder (or hub id), registering it under its config's
    version name: how a base checkpoint becomes the first parent."""
    from core.model.config import EmoLlamaConfig
    from core.model.config import resolve_checkpoint

    found = find_version(folder, url)
    if found:
        return found
    path = resolve_checkpoint(folder).resolve()
    found = find_version(str(path), url)
    if found:
        return found
    try:
        config = EmoLlamaConfig.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{folder}: not an EMO-LLaMA checkpoint ({exc})") from None
    name = config.version if not find_version(config.version, url) else f"{config.version}-{path.name}"
    return register_version(name, path, is_tiny=config.is_tiny, published=True, url=url)


def record_metrics(name: str, metrics: dict, url: str | None = None) -> None:
    with session_scope(url) as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if row is not None:
            row.metrics = {**(row.metrics or {}), **metrics}


def save_label_temperature(folder: str | Path, temperature: float) -> bool:
    """Write a fitted label temperature into a checkpoint's config.json (`label_temperature`),
    which every later load (the engine's included) applies to its label probabilities. Only a
    local checkpoint folder is written (never a hub cache); False when there is none. The file is
    replaced atomically, so a concurrent load reads the old or the new config, never half."""
    import os
    import tempfile

    from core.model.config import CONFIG_NAME, EmoLlamaConfig

    path = Path(str(folder))
    if not (path / CONFIG_NAME).is_file() or (path / CONFIG_NAME).is_symlink():
        return False
    config = EmoLlamaConfig.load(path)
    config.label_temperature = float(temperature)
    with tempfile.TemporaryDirectory(dir=path, prefix=".config-") as tmp:
        config.save(tmp)
        os.replace(Path(tmp, CONFIG_NAME), path / CONFIG_NAME)
    return True


def gate(candidate: dict, parent: dict | None, key: str, margin: float) -> tuple[bool, str]:
    """Publish only if the candidate's UAR on `key` (dataset/split) is no worse than its parent's
    minus `margin`, both measured on the same samples. The default margin is 0: a version that is
    worse on the held-out split than the one it was trained from is never published by itself
    (a margin > 0 tolerates noise on small test sets). A version whose parent was never measured
    (a base checkpoint registered by hand) cannot be compared and passes."""
    new = (candidate.get("metrics") or {}).get(key, {}).get("uar")
    if new is None:
        return False, f"{candidate['name']} has no UAR on {key}"
    measured = ((parent or {}).get("metrics") or {}).get(key, {})
    old = measured.get("uar")
    if old is None:
        return True, f"UAR {new:.3f} on {key} (no parent measurement to compare)"
    if measured.get("samples") != candidate["metrics"][key].get("samples"):
        return False, (f"{parent['name']} was measured on other {key} samples; evaluate it again: "
                       f"`python app.py evaluate --version {parent['name']} --dataset {key.split('/')[0]}`")
    if new >= old - margin:
        return True, f"UAR {new:.3f} vs parent {old:.3f} on {key} (margin {margin})"
    return False, f"UAR {new:.3f} dropped below parent {old:.3f} - {margin} on {key}"


def publish(name: str, key: str | None = None, margin: float = 0.0, force: bool = False,
            url: str | None = None) -> dict:
    """Gate-check a version, mark it published and serving, and hot-swap this process's engine."""
    version = find_version(name, url)
    if version is None:
        raise UserError(f"no model version named {name!r}")
    if not force:
        parent = find_version(version["parent"], url) if version["parent"] else None
        keys = [key] if key else list((version["metrics"] or {}).keys())
        if not keys:
            raise UserError(f"{name} has not been evaluated; run `python app.py evaluate --version {name} ...`")
        for k in keys:
            ok, why = gate(version, parent, k, margin)
            if not ok:
                raise UserError(f"not published: {why}")
    return _serve(name, url)


def rollback(name: str, url: str | None = None) -> dict:
    """Serve an earlier published version again."""
    version = find_version(name, url)
    if version is None:
        raise UserError(f"no model version named {name!r}")
    if not version["published"]:
        raise UserError(f"{name} was never published (its evaluation gate failed or it was not "
                        f"evaluated); publish it first: `python app.py versions publish {name}`")
    return _serve(name, url)


def _serve(name: str, url: str | None) -> dict:
    with session_scope(url) as s:
        for row in s.scalars(select(ModelVersion)):
            row.is_serving = row.name == name
            if row.name == name:
                row.published = True
    version = find_version(name, url)
    activate_in_engine(version)
    return version


_activate_lock = threading.Lock()


def activate_in_engine(version: dict) -> bool:
    """Hot-swap the running engine of this process (if any) to `version` (Engine.swap).

    One swap at a time: the registry watcher of the web process and a publish from the page
    may ask for the same version together; the second finds it serving (Engine.serving names
    it) and returns without loading it twice.
    """
    from core.engine import running_engine

    engine = running_engine()  # never start an engine just to swap it
    if engine is None:
        return False
    with _activate_lock:
        if engine.serving.name == version["name"]:
            return True
        engine.swap(version["folder"], name=version["name"])
    return True
