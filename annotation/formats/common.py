"""What every format reader shares: the Entry and Layout it returns, finding files in a
dataset's folder, split names, clip keys, and CSV rows that survive malformed lines.
"""
from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from annotation.formats.quoting import csv_problem
from core.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "publictest": "val", "test": "test",
                 "testing": "test", "privatetest": "test"}


@dataclass
class Entry:
    """One sample as a format reader found it, before its file is checked and hashed."""
    where: str                  # row or file, for messages ("list_patition_label.txt:12")
    media: Path
    label: str | None
    split: str = "train"
    meta: dict = field(default_factory=dict)


@dataclass
class Layout:
    """What a format reader returns: entries, rows it could not use, and what it left out."""
    entries: list[Entry] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    label_set: list[str] | None = None     # None: the smallest standard set holding the labels


def find(root: Path, name: str, want_dir: bool = False) -> Path | None:
    """`root/name` or the shallowest match below root (case-insensitive), None if absent."""
    direct = root / name
    if direct.exists() and direct.is_dir() == want_dir:
        return direct
    lowered = name.lower()
    best: Path | None = None
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth > 4:
            dirnames[:] = []
            continue
        for candidate in (dirnames if want_dir else filenames):
            if candidate.lower() == lowered:
                path = Path(dirpath) / candidate
                if best is None or len(path.parts) < len(best.parts):
                    best = path
    return best


def read_text(path: Path) -> str:
    """Split and label files are not always UTF-8 (MAFW's captions): fall back, never crash."""
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def split_name(text: str) -> str | None:
    return SPLIT_ALIASES.get(re.sub(r"[^a-z]", "", text.lower()))


def to_int(text: str) -> int | None:
    try:
        return int(float(text.strip()))
    except (ValueError, AttributeError):
        return None


def clip_key(name: str) -> str:
    """'00025.mp4', '00025', '25' -> '25': split files and disk disagree about zero padding."""
    stem = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if Path(stem).suffix.lower() in VIDEO_EXTENSIONS else stem
    return str(int(stem)) if stem.isdigit() else stem.lower()


def is_media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def frame_count(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    except OSError:
        return 0


def index_clips(root: Path, skip: Iterable[Path] = ()) -> dict[str, Path]:
    """Every clip under root by key: video files by stem, frame folders by folder name.

    A clip present in several forms (the original mp4, `clip_224x224`, `clip_224x224_16f`)
    resolves to the video file if there is one, else the frame folder with the most frames.
    """
    skip = {p.resolve() for p in skip}
    found: dict[str, tuple[tuple, Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here.resolve() in skip:
            dirnames[:] = []
            continue
        dirnames.sort()
        frames = [f for f in filenames if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if frames and here != root:
            rank = (1, -len(frames), str(here))
            key = clip_key(here.name)
            if key not in found or rank < found[key][0]:
                found[key] = (rank, here)
        for name in filenames:
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                path = here / name
                rank = (0, 0, str(path))
                key = clip_key(name)
                if key not in found or rank < found[key][0]:
                    found[key] = (rank, path)
    return {key: path for key, (_, path) in found.items()}


def csv_rows(lines: Iterable[str], name: str) -> Iterator[tuple[str, list[str] | None, str | None]]:
    """(where, cells, None) per CSV row, or (where, None, reason) for a row that cannot be parsed.

    A malformed row is one reported row, never the end of the file: the csv module starts
    afresh at the next line after an error. Feed lines split at "\\n" only (io.StringIO, or
    open(newline="\\n")), so a stray CR inside a field is an error of its own row rather than a
    silent extra row.
    """
    reader = csv.reader(lines)
    last = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"{name}:{reader.line_num}", None, csv_problem(exc)
        else:
            start = last + 1
            if reader.line_num > start and any("\n" in cell for cell in row):
                # An unclosed quote swallows the following lines into one field.
                yield (f"{name}:{start}-{reader.line_num}", None,
                       "malformed CSV row: a quoted field runs over several lines (an unclosed quote?)")
            else:
                yield f"{name}:{start}", row, None
        last = reader.line_num


def good_rows(rows: Iterable[tuple[str, list[str] | None, str | None]],
               layout: "Layout") -> list[tuple[str, list[str]]]:
    """The parsed rows; the malformed ones go to `layout.broken`."""
    good = []
    for where, row, problem in rows:
        if problem is not None:
            layout.broken.append((where, problem))
        else:
            good.append((where, row))
    return good
