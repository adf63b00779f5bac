"""Dataset import: FER datasets as their users have them on disk -> `Sample` rows.

    python app.py import --format rafdb /data/RAF-DB/basic --name rafdb
    python app.py import --format csv my_labels.csv --name mine --json

    from annotation.importers import import_dataset
    summary = import_dataset("rafdb", "/data/RAF-DB/basic", "rafdb")
    summary.added, summary.skipped, summary.broken, summary.by_label

Formats (see shared/DATASETS.md for the layouts):
    rafdb      EmoLabel/list_patition_label.txt + Image/aligned (preferred) or Image/original
    affectnet  Manually_Annotated_file_lists/{training,validation}.csv + Manually_Annotated_Images/
    ferplus    fer2013new.csv (10 votes -> majority label) + FER2013{Train,Valid,Test}/
    dfew       EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv + clips (mp4 or frame folders)
    ferv39k    4_setups/All_scenes/{train,test}_All.csv + 2_ClipsforFaceCrop/<scene>/<label>/<clip>/
    mafw       Train & Test Set/single/no_caption/set_K/{train,test}.txt + data/clips or data/frames
    folder     ROOT/<label>/<files or frame folders>, or ROOT/<split>/<label>/...
    csv        path,label[,split] (header optional; paths relative to the CSV's folder)

Every format reads into the same list of `Entry`s (media path, canonical label, split, meta) or
`(where, reason)` for a row it could not use; `_ingest` then checks each file decodes, hashes
it (sha256 of the bytes; a frame folder hashes its sorted frames) and inserts what is new.
Re-importing adds nothing twice (unique per dataset and content hash). A broken row never
aborts an import: it is listed in `ImportSummary.broken` with the reason.

Five-fold video datasets (DFEW, MAFW) store each clip once: `meta["fold"]` is the fold whose
test list holds it, and `split` is "test" for the fold chosen with `fold=` (default 1), "train"
otherwise, so evaluation can report one fold or loop over `meta.fold` for all five.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import MediaError, UserError
from core.labels import BASIC7, CANONICAL, LABEL_SETS, MAFW11, WITH_CONTEMPT8, normalize_label
from core.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

FORMATS = ("rafdb", "affectnet", "ferplus", "dfew", "ferv39k", "mafw", "folder", "csv")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "publictest": "val", "test": "test",
                 "testing": "test", "privatetest": "test"}
BATCH = 500  # rows per INSERT transaction: large enough to be fast, small enough to keep locks short

RAFDB_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger",
               7: "neutral"}
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
                   5: "disgust", 6: "anger", 7: "contempt"}
AFFECTNET_NOT_EXPRESSIONS = {8: "none", 9: "uncertain", 10: "no-face"}
FERPLUS_EMOTIONS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                    "contempt"]
FERPLUS_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
FERPLUS_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
DFEW_CODES = {1: "happiness", 2: "sadness", 3: "neutral", 4: "anger", 5: "surprise",
              6: "disgust", 7: "fear"}


@dataclass
class Entry:
    """One sample as a format reader found it, before its file is checked and hashed."""
    where: str                  # row or file, for messages ("list_patition_label.txt:12")
    media: Path
    label: str | None
    split: str = "train"
    meta: dict = field(default_factory=dict)


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


@dataclass
class Layout:
    """What a format reader returns: entries, rows it could not use, and what it left out."""
    entries: list[Entry] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    label_set: list[str] | None = None     # None: the smallest standard set holding the labels


# ----------------------------------------------------------------------------- small helpers

def _find(root: Path, name: str, want_dir: bool = False) -> Path | None:
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


def _read_text(path: Path) -> str:
    """Split and label files are not always UTF-8 (MAFW's captions): fall back, never crash."""
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def _split_name(text: str) -> str | None:
    return SPLIT_ALIASES.get(re.sub(r"[^a-z]", "", text.lower()))


def _int(text: str) -> int | None:
    try:
        return int(float(text.strip()))
    except (ValueError, AttributeError):
        return None


def _clip_key(name: str) -> str:
    """'00025.mp4', '00025', '25' -> '25': split files and disk disagree about zero padding."""
    stem = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if Path(stem).suffix.lower() in VIDEO_EXTENSIONS else stem
    return str(int(stem)) if stem.isdigit() else stem.lower()


def _is_media(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _frame_count(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    except OSError:
        return 0


def _index_clips(root: Path, skip: Iterable[Path] = ()) -> dict[str, Path]:
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
            key = _clip_key(here.name)
            if key not in found or rank < found[key][0]:
                found[key] = (rank, here)
        for name in filenames:
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                path = here / name
                rank = (0, 0, str(path))
                key = _clip_key(name)
                if key not in found or rank < found[key][0]:
                    found[key] = (rank, path)
    return {key: path for key, (_, path) in found.items()}


def _smallest_label_set(labels: Iterable[str | None]) -> list[str]:
    present = {label for label in labels if label}
    for candidate in (BASIC7, WITH_CONTEMPT8, MAFW11):
        if present <= set(candidate):
            return list(candidate)
    return list(CANONICAL)


# ----------------------------------------------------------------------------- format readers

def read_rafdb(root: Path, **_) -> Layout:
    """RAF-DB basic: `train_00001.jpg 5` lines; aligned images preferred when present."""
    layout = Layout(label_set=list(BASIC7))
    label_file = _find(root, "list_patition_label.txt") or _find(root, "list_partition_label.txt")
    if label_file is None:
        raise UserError(f"{root}: no EmoLabel/list_patition_label.txt found: is this RAF-DB basic?")
    aligned = _find(root, "aligned", want_dir=True)
    original = _find(root, "original", want_dir=True)
    if aligned is None and original is None:
        raise UserError(f"{root}: no Image/aligned or Image/original folder found")
    for number, line in enumerate(_read_text(label_file).splitlines(), 1):
        where = f"{label_file.name}:{number}"
        if not line.strip():
            continue
        parts = line.split()
        code = _int(parts[1]) if len(parts) == 2 else None
        if code not in RAFDB_CODES:
            layout.broken.append((where, f"expected '<image> <code 1-7>', got {line.strip()!r}"))
            continue
        name = parts[0]
        stem, suffix = os.path.splitext(name)
        candidates = []
        if aligned is not None:
            candidates.append((aligned / f"{stem}_aligned{suffix}", "aligned"))
        if original is not None:
            candidates.append((original / name, "original"))
        media, variant = next(((p, v) for p, v in candidates if p.exists()), candidates[0])
        split = "test" if name.lower().startswith("test") else "train"
        layout.entries.append(Entry(where, media, RAFDB_CODES[code], split,
                                    {"file": name, "variant": variant, "source_label": code}))
    return layout


def read_affectnet(root: Path, label_set: str | None = None, **_) -> Layout:
    """AffectNet manual annotations; validation.csv is the usual test set."""
    labels = LABEL_SETS.get(label_set or "affectnet8")
    if labels is None or not set(labels) <= set(WITH_CONTEMPT8):
        raise UserError("AffectNet label set must be affectnet8 (with contempt) or basic7")
    layout = Layout(label_set=list(labels))
    images = _find(root, "Manually_Annotated_Images", want_dir=True) or root
    files = [(name, split) for name, split in (("training.csv", "train"), ("validation.csv", "test"))
             if _find(root, name)]
    if not files:
        raise UserError(f"{root}: no training.csv or validation.csv (Manually_Annotated_file_lists)")
    for name, split in files:
        path = _find(root, name)
        rows = list(csv.reader(io.StringIO(_read_text(path))))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        has_header = "expression" in header
        col_path = header.index("subdirectory_filepath") if "subdirectory_filepath" in header else 0
        col_expr = header.index("expression") if has_header else 6
        for number, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
            where = f"{name}:{number}"
            if not row or not any(cell.strip() for cell in row):
                continue
            code = _int(row[col_expr]) if len(row) > col_expr else None
            if code in AFFECTNET_NOT_EXPRESSIONS:
                layout.excluded[f"code {code} ({AFFECTNET_NOT_EXPRESSIONS[code]})"] += 1
                continue
            if code not in AFFECTNET_CODES:
                layout.broken.append((where, f"expression code {row[col_expr] if len(row) > col_expr else ''!r} is not 0-10"))
                continue
            label = AFFECTNET_CODES[code]
            if label not in labels:
                layout.excluded[f"{label} (not in {label_set})"] += 1
                continue
            meta = {"file": row[col_path], "source_label": code}
            if has_header:
                for key in ("face_x", "face_y", "face_width", "face_height", "valence", "arousal"):
                    if key in header and header.index(key) < len(row):
                        value = row[header.index(key)].strip()
                        meta[key] = float(value) if re.fullmatch(r"-?[\d.]+", value) else value
            layout.entries.append(Entry(where, images / row[col_path].strip(), label, split, meta))
    return layout


def read_ferplus(root: Path, **_) -> Layout:
    """FERPlus: majority of 10 votes; ties, unknown and not-a-face majorities are left out."""
    layout = Layout(label_set=list(WITH_CONTEMPT8))
    table = _find(root, "fer2013new.csv")
    if table is None:
        raise UserError(f"{root}: no fer2013new.csv found: is this FERPlus?")
    folders = {split: _find(root, name, want_dir=True) or table.parent / name
               for split, name in FERPLUS_FOLDERS.items()}
    rows = list(csv.reader(io.StringIO(_read_text(table))))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "usage" not in header:
        raise UserError(f"{table}: expected a header 'Usage,Image name,neutral,...'")
    vote_columns = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                    "contempt", "unknown", "nf"]
    missing = [c for c in vote_columns if c not in header]
    if missing:
        raise UserError(f"{table}: missing vote columns {missing}")
    col_name = next(i for i, h in enumerate(header) if h.replace(" ", "") == "imagename")
    for number, row in enumerate(rows[1:], 2):
        where = f"{table.name}:{number}"
        if not row:
            continue
        try:
            usage = FERPLUS_USAGE[row[header.index("usage")].strip().lower()]
            votes = {c: int(float(row[header.index(c)] or 0)) for c in vote_columns}
        except (KeyError, ValueError, IndexError):
            layout.broken.append((where, "unreadable Usage or vote counts"))
            continue
        name = row[col_name].strip() if col_name < len(row) else ""
        if not name:
            layout.excluded["no image for this FER2013 row"] += 1
            continue
        top = max(votes.values())
        winners = [c for c, v in votes.items() if v == top]
        if top == 0 or len(winners) > 1:
            layout.excluded["tied votes"] += 1
            continue
        if winners[0] in ("unknown", "nf"):
            layout.excluded[f"{winners[0]} majority"] += 1
            continue
        layout.entries.append(Entry(where, folders[usage] / name, winners[0], usage,
                                    {"file": name, "votes": votes}))
    return layout


def _read_fold_lists(files: list[tuple[Path, int, str]], parse: Callable[[list[str]], tuple],
                     layout: Layout) -> dict[str, dict]:
    """Clip -> {label, folds where it is test, extra} from five-fold train/test list files."""
    clips: dict[str, dict] = {}
    for path, fold, kind in sorted(files, key=lambda f: (f[1], f[2], str(f[0]))):
        text = _read_text(path)
        dialect_comma = "," in text.split("\n", 1)[0]
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cells = [c.strip() for c in (line.split(",") if dialect_comma else line.split(None, 2))]
            where = f"{path.parent.name}/{path.name}:{number}"
            try:
                name, label, extra = parse(cells)
            except _HeaderRow:
                continue
            except (ValueError, IndexError, KeyError) as exc:
                layout.broken.append((where, f"unreadable row {line.strip()[:80]!r} ({exc})"))
                continue
            if label is None:
                layout.excluded["not single-labelled"] += 1
                continue
            key = _clip_key(name)
            clip = clips.setdefault(key, {"name": name, "label": label, "test_folds": set(),
                                          "where": where, "extra": {}})
            if clip["label"] != label:
                layout.broken.append((where, f"clip {name} is {label} here but {clip['label']} "
                                             f"in {clip['where']}"))
                clip["conflict"] = True
            if kind == "test":
                clip["test_folds"].add(fold)
            clip["extra"].update(extra)
    return clips


class _HeaderRow(Exception):
    pass


def _fold_entries(root: Path, clips: dict[str, dict], layout: Layout, fold: int,
                  skip: Iterable[Path]) -> None:
    on_disk = _index_clips(root, skip)
    for key, clip in sorted(clips.items(), key=lambda kv: kv[1]["where"]):
        if clip.get("conflict"):
            continue
        media = on_disk.get(key)
        if media is None:
            layout.broken.append((clip["where"], f"clip {clip['name']} not found under {root}"))
            continue
        folds = sorted(clip["test_folds"])
        split = "test" if fold in folds else "train"
        meta = {"clip": clip["name"], "fold": folds[0] if len(folds) == 1 else folds,
                "file": str(media.relative_to(root)), **clip["extra"]}
        layout.entries.append(Entry(clip["where"], media, clip["label"], split, meta))
    unlabelled = len(set(on_disk) - set(clips))
    if unlabelled:
        layout.notes.append(f"{unlabelled} clips on disk are in no single-label split list "
                            "(compound or unlabelled): not imported")


def read_dfew(root: Path, fold: int = 1, **_) -> Layout:
    """DFEW: `video_name,label` (codes 1-7) in five train/test folds; clips as mp4 or frames."""
    layout = Layout(label_set=list(BASIC7))
    split_dir = _find(root, "EmoLabel_DataSplit", want_dir=True)
    if split_dir is None:
        raise UserError(f"{root}: no EmoLabel_DataSplit folder found: is this DFEW?")
    files = []
    for path in sorted(split_dir.rglob("*.csv")):
        match = re.search(r"set_(\d+)", path.name)
        kind = "test" if "test" in path.parent.name.lower() else "train"
        if match and "single" in path.parent.name.lower():
            files.append((path, int(match.group(1)), kind))
        elif match is None:
            layout.notes.append(f"{path.relative_to(root)}: not a set_K.csv split file, ignored")
    if not files:
        raise UserError(f"{split_dir}: no train/test(single-labeled)/set_K.csv files")

    def parse(cells: list[str]) -> tuple:
        if cells[0].lower() in ("video_name", "name", "clip"):
            raise _HeaderRow
        code = int(float(cells[1]))
        if code == 0:
            return cells[0], None, {}
        return cells[0], DFEW_CODES[code], {"source_label": code}

    clips = _read_fold_lists(files, parse, layout)
    _fold_entries(root, clips, layout, fold, skip=[split_dir])
    return layout


def read_mafw(root: Path, fold: int = 1, **_) -> Layout:
    """MAFW: `00025.mp4 anger` lines in set_K/{train,test}.txt (single-label, 11 classes)."""
    layout = Layout(label_set=list(MAFW11))
    lists = [p for p in sorted(root.rglob("*.txt"))
             if p.stem.lower() in ("train", "test") and re.fullmatch(r"set_?\d+", p.parent.name.lower())
             and "compound" not in str(p.relative_to(root)).lower()]
    plain = [p for p in lists if "caption" not in str(p.relative_to(root)).lower()
             or "no_caption" in str(p.relative_to(root)).lower()]
    captioned = [p for p in lists if p not in plain]
    if not lists:
        raise UserError(f"{root}: no 'Train & Test Set/single/.../set_K/train.txt' lists: is this MAFW?")

    def parse(cells: list[str]) -> tuple:
        label = normalize_label(cells[1])
        if label is None:
            raise ValueError(f"{cells[1]!r} is not one of MAFW's 11 classes")
        extra = {"description": cells[2]} if len(cells) > 2 and cells[2] else {}
        return cells[0], label, extra

    def with_fold(paths: list[Path]) -> list[tuple[Path, int, str]]:
        return [(p, int(re.sub(r"\D", "", p.parent.name)), p.stem.lower()) for p in paths]

    clips = _read_fold_lists(with_fold(plain or captioned), parse, layout)
    if plain and captioned:  # captions add a description to clips already read
        described = _read_fold_lists(with_fold(captioned), parse, Layout())
        for key, clip in described.items():
            if key in clips and "description" in clip["extra"]:
                clips[key]["extra"]["description"] = clip["extra"]["description"]
    if not any("description" in c["extra"] for c in clips.values()):
        if _find(root, "descriptive_text.xlsx"):
            layout.notes.append("Labels/descriptive_text.xlsx holds clip descriptions; they are "
                                "read from the with_caption split lists, which are missing here")
    _fold_entries(root, clips, layout, fold, skip=[p.parent for p in lists])
    return layout


def read_ferv39k(root: Path, **_) -> Layout:
    """FERV39k: `Scene/Label/0001 Label` lines in {train,test}_All.csv; clips are frame folders."""
    layout = Layout(label_set=list(BASIC7))
    lists = {split: _find(root, f"{split}_All.csv") for split in ("train", "test")}
    if not any(lists.values()):
        raise UserError(f"{root}: no 4_setups/All_scenes/train_All.csv or test_All.csv: is this FERV39k?")
    clip_roots = [p for p in (root / "2_ClipsforFaceCrop" / "2_ClipsforFaceCrop",
                              root / "2_ClipsforFaceCrop") if p.is_dir()]
    found = _find(root, "2_ClipsforFaceCrop", want_dir=True)
    clip_roots += [found] if found else []
    clip_roots.append(root)
    for split, path in lists.items():
        if path is None:
            layout.notes.append(f"no {split}_All.csv: no {split} split")
            continue
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            where = f"{path.name}:{number}"
            cells = line.replace(",", " ").split()
            if not cells:
                continue
            if len(cells) < 2:
                layout.broken.append((where, f"expected '<clip path> <label>', got {line.strip()!r}"))
                continue
            label = normalize_label(cells[-1])
            if label is None:
                if number == 1 and not any(Path(r, cells[0]).exists() for r in clip_roots):
                    continue  # a header row
                layout.broken.append((where, f"{cells[-1]!r} is not an expression"))
                continue
            rel = cells[0].strip("/")
            media = next((Path(r, rel) for r in clip_roots if Path(r, rel).exists()), None)
            if media is None:
                media = next((Path(r, rel + ext) for r in clip_roots for ext in sorted(VIDEO_EXTENSIONS)
                              if Path(r, rel + ext).exists()), None)
            if media is None:
                layout.broken.append((where, f"clip {rel} not found under {root}"))
                continue
            layout.entries.append(Entry(where, media, label, split,
                                        {"clip": rel, "scene": rel.split("/")[0]}))
    return layout


def read_folder(root: Path, **_) -> Layout:
    """ROOT/<label>/... or ROOT/<split>/<label>/...; a folder of frames inside a label is a clip."""
    layout = Layout()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise UserError(f"{root}: no sub-folders: expected one folder per expression")
    split_dirs = [(p, _split_name(p.name)) for p in top]
    if all(split for _, split in split_dirs):
        groups = [(split, sorted(p for p in d.iterdir() if p.is_dir())) for d, split in split_dirs]
    else:
        groups = [("train", top)]
    ignored = 0
    for split, label_dirs in groups:
        for label_dir in label_dirs:
            label = normalize_label(re.sub(r"^[\d_\-\s]+", "", label_dir.name))
            where = str(label_dir.relative_to(root))
            if label is None:
                layout.broken.append((where, f"folder name {label_dir.name!r} is not an expression"))
                continue
            for item in sorted(label_dir.iterdir()):
                if item.is_dir() and _frame_count(item):
                    media = item
                elif item.is_file() and _is_media(item):
                    media = item
                else:
                    ignored += 1
                    continue
                layout.entries.append(Entry(str(item.relative_to(root)), media, label, split,
                                            {"file": str(item.relative_to(root))}))
    if ignored:
        layout.notes.append(f"{ignored} items that are neither media files nor frame folders ignored")
    return layout


def read_csv(path: Path, **_) -> Layout:
    """`path,label[,split]` rows; an empty label imports the sample unlabelled."""
    layout = Layout()
    if not path.is_file():
        raise UserError(f"{path}: not a CSV file")
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    has_header = "path" in header
    col = {"path": 0, "label": 1, "split": 2}
    if has_header:
        if "label" not in header:
            raise UserError(f"{path}: the header names a 'path' column but no 'label' column")
        col = {name: header.index(name) if name in header else len(header) + 99
               for name in ("path", "label", "split")}
    for number, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
        where = f"{path.name}:{number}"
        if not row or not any(cell.strip() for cell in row):
            continue
        cell = lambda name: row[col[name]].strip() if col[name] < len(row) else ""  # noqa: E731
        if not cell("path"):
            layout.broken.append((where, "empty path"))
            continue
        label = normalize_label(cell("label")) if cell("label") else None
        if cell("label") and label is None:
            layout.broken.append((where, f"{cell('label')!r} is not an expression"))
            continue
        split = _split_name(cell("split")) if cell("split") else "train"
        if split is None:
            layout.broken.append((where, f"split {cell('split')!r} is not train, val or test"))
            continue
        media = Path(cell("path"))
        media = media if media.is_absolute() else path.parent / media
        layout.entries.append(Entry(where, media, label, split, {"file": cell("path")}))
    return layout


READERS: dict[str, Callable[..., Layout]] = {
    "rafdb": read_rafdb, "affectnet": read_affectnet, "ferplus": read_ferplus, "dfew": read_dfew,
    "ferv39k": read_ferv39k, "mafw": read_mafw, "folder": read_folder, "csv": read_csv,
}
VIDEO_FORMATS = {"dfew", "ferv39k", "mafw"}


# ----------------------------------------------------------------------------- checking, hashing

def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a frame folder, of its frames' hashes in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for frame in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            digest.update(hashlib.sha256(frame.read_bytes()).digest())
        return digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(entry: Entry) -> tuple[str, str]:
    """(modality, content hash) of an entry's media, or MediaError saying what is wrong."""
    from core.media import load_image, probe_video

    media = entry.media
    if not media.exists():
        raise MediaError(f"{media}: no such file")
    if media.is_dir():
        if not _frame_count(media):
            raise MediaError(f"{media.name}: the folder holds no frame images")
        probe_video(media)
        return "video", content_hash(media)
    if media.suffix.lower() in VIDEO_EXTENSIONS:
        probe_video(media)
        return "video", content_hash(media)
    load_image(media)  # a full decode: truncated JPEGs pass a header check but fail here
    return "image", content_hash(media)


def _checked(entry: Entry) -> tuple[Entry, str | None, str | None, str | None]:
    try:
        modality, digest = _check(entry)
        return entry, modality, digest, None
    except MediaError as exc:
        return entry, None, None, str(exc)
    except OSError as exc:
        return entry, None, None, f"cannot read: {exc.strerror or exc}"
    except Exception as exc:  # a decoder's own error on a strange file: report it, keep importing
        return entry, None, None, f"unreadable ({type(exc).__name__}: {exc})"


# ----------------------------------------------------------------------------- storing

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
                   workers: int = 4) -> ImportSummary:
    """Read a dataset folder (or CSV) into the store; safe to run again (adds only what is new).

    `fold`: the DFEW/MAFW fold whose test list becomes split "test". `label_set`: AffectNet's
    "affectnet8" (default) or "basic7". `min_submitted`: annotators wanted per record.
    """
    from sqlalchemy import select
    from tqdm import tqdm

    from db.models import Sample
    from db.models import utcnow
    from db.session import session_scope

    if fmt not in READERS:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise UserError(f"{path}: no such file or folder")
    if fmt != "csv" and not root.is_dir():
        raise UserError(f"{path}: the {fmt} format expects the dataset's folder")
    name = (name or (root.stem if fmt in ("folder", "csv") else fmt)).strip()
    if not re.fullmatch(r"[\w.\-]{1,120}", name):
        raise UserError(f"dataset name {name!r}: use letters, digits, '_', '-' or '.'")
    if not 1 <= fold <= 5:
        raise UserError("--fold must be 1 to 5")
    if min_submitted is not None and min_submitted < 1:
        raise UserError("--min-submitted must be at least 1")

    layout = READERS[fmt](root, fold=fold, label_set=label_set)
    summary = ImportSummary(dataset=name, format=fmt, broken=list(layout.broken),
                            excluded=layout.excluded, notes=list(layout.notes))
    if not layout.entries and not layout.broken:
        raise UserError(f"{path}: found no samples in the {fmt} layout")

    with session_scope(url) as session:
        dataset = None
        known: set[str] = set()
        pending: list[dict] = []
        bar = tqdm(total=len(layout.entries), desc=f"import {name}", unit="sample",
                   disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            # Decoding and hashing release the GIL; map() keeps file order, so ids are stable.
            for entry, modality, digest, error in pool.map(_checked, layout.entries):
                bar.update(1)
                if error is not None:
                    summary.broken.append((entry.where, error))
                    continue
                if dataset is None:
                    summary.modality = "video" if fmt in VIDEO_FORMATS else modality
                    labels = layout.label_set or _smallest_label_set(e.label for e in layout.entries)
                    dataset = _dataset_row(session, name, fmt, root, summary.modality, labels,
                                           min_submitted)
                    known = set(session.scalars(select(Sample.content_hash)
                                                .where(Sample.dataset_id == dataset.id)))
                if modality != summary.modality:
                    summary.broken.append((entry.where, f"a {modality} in a {summary.modality} dataset"))
                    continue
                summary.by_label[entry.label or "unlabelled"] += 1
                summary.by_split[entry.split] += 1
                if digest in known:
                    summary.skipped += 1
                    continue
                known.add(digest)
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
        bar.close()
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
