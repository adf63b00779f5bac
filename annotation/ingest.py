"""Dataset import: a format's entries (annotation/formats/) -> checked, hashed `Sample` rows.

    python app.py import --format rafdb /data/RAF-DB/basic --name rafdb
    python app.py import --format csv my_labels.csv --name mine --json

    from annotation.ingest import import_dataset
    summary = import_dataset("rafdb", "/data/RAF-DB/basic", "rafdb")
    summary.added, summary.skipped, summary.broken, summary.by_label

A format reader returns `Entry`s (media path, canonical label, split, meta) and `(where,
reason)` for rows it could not use; `import_dataset` then checks each file decodes, hashes it
(core.media.content_hash) and inserts what is new. Re-importing adds nothing twice (unique per
dataset and content hash). A broken row never aborts an import: it is listed in
`ImportSummary.broken` with the reason.

`split=` ("train", "val" or "test") is the split of samples whose layout names none (a folder
without split sub-folders, CSV rows without a split cell, a FER2013 CSV without Usage) and
imports only that split where the layout names splits. `meta["aligned"] = True` marks a face
crop (the engine then skips detection): the default for fer2013, FERPlus (the same crops) and
RAF-DB's aligned images; `aligned=True/False` sets it for every sample of an import, and a
re-import updates it on samples already in the store.

Safety: messages quote at most a short escaped excerpt of a cell (annotation/formats/quoting.py);
paths are confined as annotation/import_roots.py says.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from annotation.formats import FILE_FORMATS, FORMATS, VIDEO_FORMATS
from annotation.formats.common import SPLITS, Entry, frame_count
from annotation.formats.quoting import clean, quote
from annotation.import_roots import check_import_path, import_roots, inside, store_private_paths
from core.errors import MediaError, UserError
from core.labels import BASIC7, CANONICAL, MAFW11, WITH_CONTEMPT8
from core.media import VIDEO_EXTENSIONS, content_hash

BATCH = 500  # rows per INSERT transaction: large enough to be fast, small enough to keep locks short


@dataclass
class ImportSummary:
    dataset: str
    format: str
    modality: str = "image"
    added: int = 0
    skipped: int = 0                                      # already in the store (same content)
    broken: list[tuple[str, str]] = field(default_factory=list)   # (row or file, reason)
    excluded: Counter = field(default_factory=Counter)   # rows left out on purpose, by reason
    by_label: Counter = field(default_factory=Counter)   # samples read (added + skipped)
    by_split: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)       # parts of the layout not understood

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "format": self.format, "modality": self.modality,
                "added": self.added, "skipped": self.skipped,
                "broken": [{"where": w, "reason": r} for w, r in self.broken],
                "excluded": dict(sorted(self.excluded.items())),
                "by_label": dict(sorted(self.by_label.items())),
                "by_split": dict(sorted(self.by_split.items())), "notes": self.notes}


def is_aligned(meta: dict | None) -> bool:
    """Whether a sample's image is a face crop (import marks it; detection can be skipped)."""
    return bool((meta or {}).get("aligned"))


def _smallest_label_set(labels: Iterable[str | None]) -> list[str]:
    present = {label for label in labels if label}
    for candidate in (BASIC7, WITH_CONTEMPT8, MAFW11):
        if present <= set(candidate):
            return list(candidate)
    return list(CANONICAL)


def _shown(media: Path) -> str:
    """A media path as a message shows it: its last characters, escaped (the path may be a
    cell of whatever file was imported)."""
    return quote(str(media), tail=True)


def _check(entry: Entry) -> tuple[str, str]:
    """(modality, content hash) of an entry's media, or MediaError saying what is wrong."""
    from core.media import load_image, probe_video

    media = entry.media
    if not media.exists():
        raise MediaError(f"{_shown(media)}: no such file")
    if media.is_dir():
        if not frame_count(media):
            raise MediaError(f"{_shown(media)}: the folder holds no frame images")
        probe_video(media)
        return "video", content_hash(media)
    if media.suffix.lower() in VIDEO_EXTENSIONS:
        probe_video(media)
        return "video", content_hash(media)
    load_image(media)  # a full decode: truncated JPEGs pass a header check but fail here
    return "image", content_hash(media)


def _media_message(entry: Entry, message: str) -> str:
    """core.media's message with the file named as `_shown` names it."""
    for name in (str(entry.media), entry.media.name):
        if name and message.startswith(name + ":"):
            return _shown(entry.media) + message[len(name):]
    return message


def _checked(entry: Entry) -> tuple[Entry, str | None, str | None, str | None]:
    try:
        modality, digest = _check(entry)
        return entry, modality, digest, None
    except MediaError as exc:
        return entry, None, None, _media_message(entry, str(exc))
    except OSError as exc:
        return entry, None, None, f"{_shown(entry.media)}: cannot read ({exc.strerror or type(exc).__name__})"
    except Exception as exc:  # a decoder's own error on a strange file: report it, keep importing
        return entry, None, None, f"{_shown(entry.media)}: unreadable ({type(exc).__name__}: {quote(exc, 60)[1:-1]})"


def _refused(entry: Entry, private: list[Path], roots: list[Path] | None) -> str | None:
    """Why an entry's file may not be imported (a CSV row naming the store's key, a symlink
    out of the import folders), or None."""
    try:
        resolved = entry.media.resolve()
        str(resolved).encode("utf-8")   # the store keeps paths as UTF-8 text
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8"
    except (OSError, ValueError, RuntimeError):
        return f"{_shown(entry.media)}: not a usable path"
    if any(inside(resolved, p) or inside(p, resolved) for p in private):
        return f"{_shown(entry.media)}: one of the store's own files, not a dataset file"
    if roots is not None and not any(inside(resolved, root) for root in roots):
        return f"{_shown(entry.media)}: outside the import folders"
    return None


def _dataset_row(session, name: str, fmt: str, root: Path, modality: str, label_set: list[str],
                 min_submitted: int | None):
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from db.models import Dataset

    dataset = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if dataset is None:
        dataset = Dataset(name=name, modality=modality, label_set=label_set, source_format=fmt,
                          root=str(root), min_submitted=min_submitted or 1)
        session.add(dataset)
        try:
            session.commit()
        except IntegrityError:  # another import created it meanwhile
            session.rollback()
            dataset = session.scalars(select(Dataset).where(Dataset.name == name)).one()
    if dataset.modality != modality:
        raise UserError(f"dataset {name} holds {dataset.modality}s; this import has {modality}s. "
                        "Use another --name.")
    merged = [label for label in CANONICAL if label in set(dataset.label_set) | set(label_set)]
    if merged != list(dataset.label_set):
        dataset.label_set = merged
    if min_submitted is not None:
        dataset.min_submitted = min_submitted
    session.commit()
    return dataset


def _insert(session, rows: list[dict]) -> int:
    """Insert new samples; rows another process inserted meanwhile count as skipped."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from db.models import Sample

    if not rows:
        return 0
    try:
        session.execute(insert(Sample), rows)
        session.commit()
        return len(rows)
    except IntegrityError:
        session.rollback()
    added = 0
    for row in rows:
        try:
            session.execute(insert(Sample), [row])
            session.commit()
            added += 1
        except IntegrityError:
            session.rollback()
    return added


def import_dataset(fmt: str, path: str | os.PathLike, name: str | None = None,
                   url: str | None = None, progress: bool = True, fold: int = 1,
                   label_set: str | None = None, min_submitted: int | None = None,
                   workers: int = 4, split: str | None = None, aligned: bool | None = None,
                   confined: bool = False, media_dir: str | os.PathLike | None = None
                   ) -> ImportSummary:
    """Read a dataset folder (or CSV) into the store; safe to run again (adds only what is new).

    `fold`: the DFEW/MAFW fold whose test list becomes split "test". `label_set`: AffectNet's
    "affectnet8" (default) or "basic7". `min_submitted`: annotators wanted per record.
    `split`: the split of samples whose layout names none; where it names splits, only this
    one is imported. `aligned`: mark every sample as a face crop (True) or not (False); None
    keeps the format's default. `confined`: only paths inside `import_roots()` (the web app).
    `media_dir`: where fer2013 writes its PNGs (default `<data dir>/datasets`).
    """
    from sqlalchemy import select, update
    from tqdm import tqdm

    from db.models import Sample
    from db.models import utcnow
    from db.session import data_dir, session_scope

    if fmt not in FORMATS:
        raise UserError(f"unknown format {quote(fmt)}: choose one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}")
    shown = clean(path, 200)
    try:
        root = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):   # a NUL byte, a symlink loop
        raise UserError(f"{shown}: not a usable path") from None
    name = (name or (root.stem if fmt in ("folder", "csv") else fmt)).strip()
    if not re.fullmatch(r"[\w.\-]{1,120}", name):
        raise UserError(f"dataset name {quote(name, 60)}: use letters, digits, '_', '-' or '.'")
    # Before looking at the path: outside the roots, even "no such file" would say too much.
    root = check_import_path(path, confined=confined, url=url)
    if not root.exists():
        raise UserError(f"{shown}: no such file or folder")
    if fmt not in FILE_FORMATS and not root.is_dir():
        raise UserError(f"{shown}: the {fmt} format expects the dataset's folder")
    if not 1 <= fold <= 5:
        raise UserError("--fold must be 1 to 5")
    if min_submitted is not None and min_submitted < 1:
        raise UserError("--min-submitted must be at least 1")

    media_root = Path(media_dir).expanduser().resolve() if media_dir else data_dir() / "datasets"
    layout = FORMATS[fmt].read(root, fold=fold, label_set=label_set, split=split,
                          media_dir=media_root, name=name, progress=progress)
    if split is not None:   # layouts that name their splits: keep the one asked for
        kept = [e for e in layout.entries if e.split == split]
        for other, count in Counter(e.split for e in layout.entries if e.split != split).items():
            layout.excluded[f"{other} samples (not --split {split})"] += count
        layout.entries = kept
    private = store_private_paths(url)
    # Written by the importer itself (fer2013), so inside the allowed folders by construction.
    roots = import_roots() + [media_root / name] if confined else None
    entries = []
    for entry in layout.entries:
        why = _refused(entry, private, roots)
        if why:
            layout.broken.append((entry.where, why))
            continue
        if aligned is not None:
            entry.meta["aligned"] = bool(aligned)
        entries.append(entry)
    summary = ImportSummary(dataset=name, format=fmt, broken=list(layout.broken),
                            excluded=layout.excluded, notes=list(layout.notes))
    if not entries and not layout.broken:
        if split is not None and layout.excluded:
            raise UserError(f"{shown}: no {split} samples in the {fmt} layout")
        raise UserError(f"{shown}: found no samples in the {fmt} layout")

    relabelled: dict[int, bool] = {}   # samples already stored whose face-crop flag changes
    with session_scope(url) as session:
        dataset = None
        known: dict[str, tuple[int, bool | None]] = {}   # content hash -> (id, aligned flag)
        pending: list[dict] = []
        bar = tqdm(total=len(entries), desc=f"import {name}", unit="sample",
                   disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Decoding and hashing release the GIL; map() keeps file order, so ids are stable.
            for entry, modality, digest, error in pool.map(_checked, entries):
                bar.update(1)
                if error is not None:
                    summary.broken.append((entry.where, error))
                    continue
                if dataset is None:
                    summary.modality = "video" if fmt in VIDEO_FORMATS else modality
                    labels = layout.label_set or _smallest_label_set(e.label for e in entries)
                    dataset = _dataset_row(session, name, fmt, root, summary.modality, labels,
                                           min_submitted)
                    # The flag only, not whole meta dicts: a dataset may hold 400k samples.
                    known = {h: (i, flag) for i, h, flag in session.execute(
                        select(Sample.id, Sample.content_hash, Sample.meta["aligned"].as_boolean())
                        .where(Sample.dataset_id == dataset.id))}
                if modality != summary.modality:
                    summary.broken.append((entry.where, f"a {modality} in a {summary.modality} dataset"))
                    continue
                summary.by_label[entry.label or "unlabelled"] += 1
                summary.by_split[entry.split] += 1
                if digest in known:
                    summary.skipped += 1
                    sample_id, flag = known[digest]
                    if "aligned" in entry.meta and flag != entry.meta["aligned"]:
                        known[digest] = (sample_id, entry.meta["aligned"])
                        if sample_id > 0:   # not a twin of a sample added by this import
                            relabelled[sample_id] = entry.meta["aligned"]
                    continue
                known[digest] = (-1, entry.meta.get("aligned"))
                pending.append({"dataset_id": dataset.id, "media_path": str(entry.media.resolve()),
                                "content_hash": digest, "modality": modality, "label": entry.label,
                                "split": entry.split, "meta": entry.meta, "created_at": utcnow()})
                if len(pending) >= BATCH:
                    added = _insert(session, pending)
                    summary.added += added
                    summary.skipped += len(pending) - added
                    pending = []
        added = _insert(session, pending)
        summary.added += added
        summary.skipped += len(pending) - added
        ids = sorted(relabelled)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            metas = dict(session.execute(select(Sample.id, Sample.meta).where(Sample.id.in_(chunk))).all())
            session.execute(update(Sample), [  # by primary key
                {"id": i, "meta": {**(metas.get(i) or {}), "aligned": relabelled[i]}} for i in chunk])
            session.commit()
        bar.close()
    if relabelled:
        marked = sum(relabelled.values())
        if marked:
            summary.notes.append(f"{marked} samples already in the store now marked as face crops")
        if len(relabelled) - marked:
            summary.notes.append(f"{len(relabelled) - marked} samples already in the store no "
                                 "longer marked as face crops")
    # Whatever a reader or decoder put into a message, it reaches people escaped and capped.
    summary.broken = [(clean(where, 120), clean(reason)) for where, reason in summary.broken]
    summary.notes = [clean(note) for note in summary.notes]
    return summary


def format_summary(summary: ImportSummary, max_broken: int = 20) -> str:
    """The summary as the CLI prints it."""
    lines = [f"{summary.dataset} ({summary.format}, {summary.modality}): {summary.added} added, "
             f"{summary.skipped} already there, {len(summary.broken)} broken"]
    if summary.by_split:
        lines.append("  by split: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_split.items())))
    if summary.by_label:
        lines.append("  by label: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.by_label.items())))
    for reason, count in sorted(summary.excluded.items()):
        lines.append(f"  left out: {count} x {reason}")
    for note in summary.notes:
        lines.append(f"  note: {note}")
    for where, reason in summary.broken[:max_broken]:
        lines.append(f"  broken: {where}: {reason}")
    if len(summary.broken) > max_broken:
        lines.append(f"  ... and {len(summary.broken) - max_broken} more broken (see --json)")
    return "\n".join(lines)
