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
    folder     ROOT/<label>/<files or frame folders>, or ROOT/<split>/<label>/... (split folders
               train/ val|valid|validation|PublicTest/ test|PrivateTest/, also FER2013Train-style)
    csv        path,label[,split] (header optional; paths relative to the CSV's folder)
    fer2013    the original fer2013.csv (emotion,pixels,Usage): each row's 48x48 pixels are
               written once as a PNG under <data dir>/datasets/<name>/<split>/

Every format reads into the same list of `Entry`s (media path, canonical label, split, meta) or
`(where, reason)` for a row it could not use; `_ingest` then checks each file decodes, hashes
it (sha256 of the bytes; a frame folder hashes its sorted frames) and inserts what is new.
Re-importing adds nothing twice (unique per dataset and content hash). A broken row never
aborts an import: it is listed in `ImportSummary.broken` with the reason.

Five-fold video datasets (DFEW, MAFW) store each clip once: `meta["fold"]` is the fold whose
test list holds it, and `split` is "test" for the fold chosen with `fold=` (default 1), "train"
otherwise, so evaluation can report one fold or loop over `meta.fold` for all five.

`split=` ("train", "val" or "test") is the split of samples whose layout names none (a folder
without split sub-folders, CSV rows without a split cell, a FER2013 CSV without Usage) and
imports only that split where the layout names splits. `meta["aligned"] = True` marks a face
crop (the engine then skips detection): the default for fer2013, FERPlus (the same crops) and
RAF-DB's aligned images; `aligned=True/False` sets it for every sample of an import, and a
re-import updates it on samples already in the store.

Safety: an error message never carries more of a file than a short escaped excerpt of one cell
(`_quote`), because the file may not be a dataset at all (an admin pointed at /proc/self/environ).
`confined=True` (the web app) accepts only paths inside `import_roots()`, and no import reads the
store's own private files (`store_private_paths()`: the database, the secret key, backups).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import MediaError, UserError
from core.labels import BASIC7, CANONICAL, LABEL_SETS, MAFW11, WITH_CONTEMPT8, normalize_label
from core.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

FORMATS = ("rafdb", "affectnet", "ferplus", "dfew", "ferv39k", "mafw", "folder", "csv", "fer2013")
FILE_FORMATS = {"csv", "fer2013"}   # formats whose path may be one file rather than a folder
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
FER2013_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness", 5: "surprise",
                 6: "neutral"}
FER2013_SIDE = 48
IMPORT_ROOTS_ENV = "EMO_IMPORT_ROOTS"
QUOTE_LIMIT = 40     # characters of a cell an error message may show
MESSAGE_LIMIT = 300  # characters of any one "where" or "reason" in a summary


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


# ----------------------------------------------------------------------------- safe messages

def _escape(ch: str) -> str:
    """One character as repr() would show it inside '...': control characters never pass."""
    if ch == "'":
        return "\\'"
    if ch == "\\":
        return "\\\\"
    return ch if ch.isprintable() else repr(ch)[1:-1]


def _quote(text: object, limit: int = QUOTE_LIMIT, tail: bool = False) -> str:
    """A cell as an error message may show it: '...' with at most `limit` escaped characters.

    The imported file may be anything an admin typed a path to (/proc/self/environ, a key
    file): a message quotes a short, escaped excerpt of one cell, never a line. `tail` keeps the
    end instead (a file path's end is its name).
    """
    chars = list(str(text))
    if tail:
        chars.reverse()
    body, used = [], 0
    for ch in chars:
        piece = _escape(ch)
        if used + len(piece) > limit:
            break
        body.append(piece)
        used += len(piece)
    cut = len(body) < len(chars)
    if tail:
        return "'" + ("…" if cut else "") + "".join(reversed(body)) + "'"
    return "'" + "".join(body) + ("…" if cut else "") + "'"


# A plain word no longer than a label name can be (the longest, "disappointment", has 14).
_WORD_CELL = re.compile(r"[A-Za-z][A-Za-z' _\-]{0,15}")


def _quote_word(text: str) -> str:
    """A label or split cell: quoted when it is a short plain word (a typo the user wants to
    see), else only described: keys and passwords have digits, symbols or length, so a cell of
    some other file (KEY=value lines) is never shown."""
    text = text.strip()
    if _WORD_CELL.fullmatch(text):
        return _quote(text)
    return f"(a {len(text)}-character cell)"


def _quote_code(text: str) -> str:
    """A cell that should hold a number (a label code, a pixel): quoted only if short."""
    text = text.strip()
    if re.fullmatch(r"[\w.+\-]{1,6}", text):
        return _quote(text)
    return f"(a {len(text)}-character cell)"


def _clean(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """The last line of defence for anything a summary shows: no control characters, capped."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return out if len(out) <= limit else out[:limit - 1] + "…"


def _has_control(text: str) -> bool:
    return any(not ch.isprintable() for ch in text)


def _csv_problem(exc: csv.Error) -> str:
    """The csv module's complaint in words; its messages never carry the row's text."""
    message = str(exc)
    if "new-line character" in message:
        return "malformed CSV row: a stray carriage return (CR) inside a field"
    if "field larger than field limit" in message:
        return f"malformed CSV row: a field over {csv.field_size_limit():,} characters"
    return f"malformed CSV row ({_clean(message, 80)})"


def _csv_rows(lines: Iterable[str], name: str) -> Iterator[tuple[str, list[str] | None, str | None]]:
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
            yield f"{name}:{reader.line_num}", None, _csv_problem(exc)
        else:
            start = last + 1
            if reader.line_num > start and any("\n" in cell for cell in row):
                # An unclosed quote swallows the following lines into one field.
                yield (f"{name}:{start}-{reader.line_num}", None,
                       "malformed CSV row: a quoted field runs over several lines (an unclosed quote?)")
            else:
                yield f"{name}:{start}", row, None
        last = reader.line_num


def _good_rows(rows: Iterable[tuple[str, list[str] | None, str | None]],
               layout: "Layout") -> list[tuple[str, list[str]]]:
    """The parsed rows; the malformed ones go to `layout.broken`."""
    good = []
    for where, row, problem in rows:
        if problem is not None:
            layout.broken.append((where, problem))
        else:
            good.append((where, row))
    return good


# ----------------------------------------------------------------------------- where imports may read

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


def _inside(path: Path, folder: Path) -> bool:
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
    shown = _quote(path, 120, tail=True)
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        raise UserError(f"{shown}: not a usable path") from None
    for private in store_private_paths(url):
        if _inside(resolved, private) or _inside(private, resolved):
            raise UserError(f"{shown} is or holds the store's own files (database, "
                            "secret key or backups): import a dataset's folder or file, not the store")
    if confined:
        roots = import_roots()
        if not any(_inside(resolved, root) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise UserError(f"{shown} is outside the import folders ({allowed}): copy or link "
                            f"the dataset under one of them, or set {IMPORT_ROOTS_ENV} on the server")
    return resolved


def is_aligned(meta: dict | None) -> bool:
    """Whether a sample's image is a face crop (import marks it; detection can be skipped)."""
    return bool((meta or {}).get("aligned"))


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
            layout.broken.append((where, f"expected '<image> <code 1-7>', got {_quote(line.strip())}"))
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
        # RAF-DB's aligned/ images are 100x100 face crops: the engine may skip detection.
        layout.entries.append(Entry(where, media, RAFDB_CODES[code], split,
                                    {"file": name, "variant": variant, "source_label": code,
                                     "aligned": variant == "aligned"}))
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
        rows = _good_rows(_csv_rows(io.StringIO(_read_text(path)), name), layout)
        header = [h.strip().lower() for h in rows[0][1]] if rows else []
        has_header = "expression" in header
        col_path = header.index("subdirectory_filepath") if "subdirectory_filepath" in header else 0
        col_expr = header.index("expression") if has_header else 6
        for where, row in rows[1:] if has_header else rows:
            if not row or not any(cell.strip() for cell in row):
                continue
            code = _int(row[col_expr]) if len(row) > col_expr else None
            if code in AFFECTNET_NOT_EXPRESSIONS:
                layout.excluded[f"code {code} ({AFFECTNET_NOT_EXPRESSIONS[code]})"] += 1
                continue
            if code not in AFFECTNET_CODES:
                layout.broken.append((where, f"expression code {_quote_code(row[col_expr] if len(row) > col_expr else '')} is not 0-10"))
                continue
            label = AFFECTNET_CODES[code]
            if label not in labels:
                layout.excluded[f"{label} (not in {label_set})"] += 1
                continue
            if col_path >= len(row) or not row[col_path].strip() or _has_control(row[col_path]):
                layout.broken.append((where, "no usable subDirectory_filePath"))
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
    rows = _good_rows(_csv_rows(io.StringIO(_read_text(table)), table.name), layout)
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    if "usage" not in header:
        raise UserError(f"{table}: expected a header 'Usage,Image name,neutral,...'")
    vote_columns = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                    "contempt", "unknown", "nf"]
    missing = [c for c in vote_columns if c not in header]
    if missing:
        raise UserError(f"{table}: missing vote columns {missing}")
    col_name = next(i for i, h in enumerate(header) if h.replace(" ", "") == "imagename")
    for where, row in rows[1:]:
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
        if _has_control(name) or "/" in name or "\\" in name:
            layout.broken.append((where, f"image name {_quote(name)} is not a file name"))
            continue
        top = max(votes.values())
        winners = [c for c, v in votes.items() if v == top]
        if top == 0 or len(winners) > 1:
            layout.excluded["tied votes"] += 1
            continue
        if winners[0] in ("unknown", "nf"):
            layout.excluded[f"{winners[0]} majority"] += 1
            continue
        # FERPlus relabels FER2013's own 48x48 face crops.
        layout.entries.append(Entry(where, folders[usage] / name, winners[0], usage,
                                    {"file": name, "votes": votes, "aligned": True}))
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
            except _RowProblem as exc:  # our own message, cells already quoted
                layout.broken.append((where, str(exc)))
                continue
            except (ValueError, IndexError, KeyError) as exc:
                # Not the exception's text: int("...") would repeat the whole cell.
                layout.broken.append((where, f"unreadable row {_quote(line.strip())} "
                                             f"({type(exc).__name__})"))
                continue
            if label is None:
                layout.excluded["not single-labelled"] += 1
                continue
            key = _clip_key(name)
            clip = clips.setdefault(key, {"name": name, "label": label, "test_folds": set(),
                                          "where": where, "extra": {}})
            if clip["label"] != label:
                layout.broken.append((where, f"clip {_quote(name)[1:-1]} is {label} here but "
                                             f"{clip['label']} in {clip['where']}"))
                clip["conflict"] = True
            if kind == "test":
                clip["test_folds"].add(fold)
            clip["extra"].update(extra)
    return clips


class _HeaderRow(Exception):
    pass


class _RowProblem(ValueError):
    """A row a split-list parser rejects, with a message safe to show."""


def _fold_entries(root: Path, clips: dict[str, dict], layout: Layout, fold: int,
                  skip: Iterable[Path]) -> None:
    on_disk = _index_clips(root, skip)
    for key, clip in sorted(clips.items(), key=lambda kv: kv[1]["where"]):
        if clip.get("conflict"):
            continue
        media = on_disk.get(key)
        if media is None:
            layout.broken.append((clip["where"], f"clip {_quote(clip['name'])[1:-1]} not found "
                                                 f"under {root}"))
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
            raise _RowProblem(f"{_quote_word(cells[1])} is not one of MAFW's 11 classes")
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
                layout.broken.append((where, f"expected '<clip path> <label>', got {_quote(line.strip())}"))
                continue
            label = normalize_label(cells[-1])
            if label is None:
                if number == 1 and not any(Path(r, cells[0]).exists() for r in clip_roots):
                    continue  # a header row
                layout.broken.append((where, f"{_quote_word(cells[-1])} is not an expression"))
                continue
            rel = cells[0].strip("/")
            media = next((Path(r, rel) for r in clip_roots if Path(r, rel).exists()), None)
            if media is None:
                media = next((Path(r, rel + ext) for r in clip_roots for ext in sorted(VIDEO_EXTENSIONS)
                              if Path(r, rel + ext).exists()), None)
            if media is None:
                layout.broken.append((where, f"clip {_quote(rel)[1:-1]} not found under {root}"))
                continue
            layout.entries.append(Entry(where, media, label, split,
                                        {"clip": rel, "scene": rel.split("/")[0]}))
    return layout


def _split_folder(name: str) -> str | None:
    """The split a top-level folder names: train/, validation/, PublicTest/, FER2013Valid/ ..."""
    exact = _split_name(name)
    if exact:
        return exact
    letters = re.sub(r"[^a-z]", "", name.lower())
    # FERPlus-style "FER2013Train", "train_set": an alias at either end of the name.
    for alias in sorted(SPLIT_ALIASES, key=len, reverse=True):
        if alias != "dev" and (letters.endswith(alias) or letters.startswith(alias)):
            return SPLIT_ALIASES[alias]
    return None


def _folder_label(name: str) -> str | None:
    return normalize_label(re.sub(r"^[\d_\-\s]+", "", name))


def read_folder(root: Path, split: str | None = None, **_) -> Layout:
    """ROOT/<label>/... or ROOT/<split>/<label>/...; a folder of frames inside a label is a clip.

    Without split folders every sample gets `split` (default train).
    """
    layout = Layout()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise UserError(f"{root}: no sub-folders: expected one folder per expression")
    split_dirs = [(p, _split_folder(p.name)) for p in top if _split_folder(p.name)]
    # Split folders only when no top folder is itself an expression (a class named "test"
    # does not exist; one named "sad" beside "train" means a label layout with a stray folder).
    if split_dirs and not any(_folder_label(p.name) for p in top):
        groups = [(name, sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
                  for d, name in split_dirs]
        others = [p.name for p in top if not _split_folder(p.name)]
        if others:
            layout.notes.append(f"folders that name no split ignored: "
                                f"{', '.join(_quote(n)[1:-1] for n in others[:5])}")
    else:
        groups = [(split or "train", top)]
    ignored = 0
    for group_split, label_dirs in groups:
        for label_dir in label_dirs:
            label = _folder_label(label_dir.name)
            where = str(label_dir.relative_to(root))
            if label is None:
                layout.broken.append((where, f"folder name {_quote(label_dir.name)} is not an expression"))
                continue
            for item in sorted(label_dir.iterdir()):
                if item.is_dir() and _frame_count(item):
                    media = item
                elif item.is_file() and _is_media(item):
                    media = item
                else:
                    ignored += 1
                    continue
                layout.entries.append(Entry(str(item.relative_to(root)), media, label, group_split,
                                            {"file": str(item.relative_to(root))}))
    if ignored:
        layout.notes.append(f"{ignored} items that are neither media files nor frame folders ignored")
    return layout


def _decode_csv(path: Path) -> str:
    """A CSV of file paths: UTF-8, else UTF-8 with the undecodable bytes kept as surrogates, so
    the rows that are fine still import and only the broken ones are reported."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")


def _cell_problem(text: str, what: str) -> str | None:
    """Why a cell cannot be a path or a label, without repeating it when it is binary junk."""
    if "\x00" in text or _has_control(text):
        return f"the {what} holds control or undecodable characters"
    return None


def read_csv(path: Path, split: str | None = None, **_) -> Layout:
    """`path,label[,split]` rows; an empty label imports the sample unlabelled.

    Rows without a split cell get `split` (default train).
    """
    layout = Layout()
    if not path.is_file():
        raise UserError(f"{path}: not a CSV file")
    rows = _good_rows(_csv_rows(io.StringIO(_decode_csv(path)), path.name), layout)
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    has_header = "path" in header
    col = {"path": 0, "label": 1, "split": 2}
    if has_header:
        if "label" not in header:
            raise UserError(f"{path}: the header names a 'path' column but no 'label' column")
        col = {name: header.index(name) if name in header else len(header) + 99
               for name in ("path", "label", "split")}
    for where, row in rows[1:] if has_header else rows:
        if not row or not any(cell.strip() for cell in row):
            continue
        if not has_header and len(row) < 2:
            # One cell per line is not `path,label`: most likely not a dataset list at all
            # (a key file, an environment dump). Say so without repeating the line.
            layout.broken.append((where, "expected 'path,label[,split]': the row has 1 column"))
            continue
        cell = lambda name: row[col[name]].strip() if col[name] < len(row) else ""  # noqa: E731
        if not cell("path"):
            layout.broken.append((where, "empty path"))
            continue
        problem = _cell_problem(cell("path"), "path") or _cell_problem(cell("label"), "label") \
            or _cell_problem(cell("split"), "split cell")
        if problem:
            layout.broken.append((where, problem))
            continue
        label = normalize_label(cell("label")) if cell("label") else None
        if cell("label") and label is None:
            layout.broken.append((where, f"label {_quote_word(cell('label'))} is not an expression"))
            continue
        row_split = _split_name(cell("split")) if cell("split") else (split or "train")
        if row_split is None:
            layout.broken.append((where, f"split {_quote_word(cell('split'))} is not train, val or test"))
            continue
        media = Path(cell("path"))
        media = media if media.is_absolute() else path.parent / media
        layout.entries.append(Entry(where, media, label, row_split, {"file": cell("path")}))
    if not layout.entries and layout.broken:
        layout.notes.append("no row reads as 'path,label[,split]': is this the dataset's CSV?")
    return layout


def _fer2013_table(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("fer2013.csv", "icml_face_data.csv"):
        found = _find(path, name)
        if found is not None:
            return found
    raise UserError(f"{path}: no fer2013.csv found: give the FER2013 CSV (emotion,pixels,Usage)")


def _lines_with_progress(f, bar) -> Iterator[str]:
    for line in f:
        bar.update(len(line))
        yield line


def _fer2013_pixels(text: str) -> tuple[object | None, str | None]:
    """(48x48 uint8 array, None) or (None, why not) for a row's `pixels` cell."""
    import numpy as np

    tokens = text.split()
    if len(tokens) != FER2013_SIDE * FER2013_SIDE:
        return None, f"{len(tokens)} pixel values, expected {FER2013_SIDE * FER2013_SIDE} (48×48)"
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in tokens if not t.isdigit()), tokens[0])
        return None, f"pixel value {_quote_code(bad)} is not a whole number"
    if values.min() < 0 or values.max() > 255:
        return None, "pixel values must be 0-255"
    return values.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE), None


def _write_png_once(folder: Path, pixels) -> Path:
    """The crop as a PNG named by its pixels' hash, written only if absent.

    Named by pixels, not by row number: a changed CSV never overwrites a file a stored sample
    points to, and a re-import reuses the file as it is (its bytes, hence its content hash, stay
    those of the first import even if a newer Pillow would encode them differently).
    """
    from PIL import Image

    target = folder / f"{hashlib.sha256(pixels.tobytes()).hexdigest()[:20]}.png"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, target)  # readers never see half a file
    return target


def read_fer2013(path: Path, split: str | None = None, media_dir: Path | None = None,
                 name: str = "fer2013", progress: bool = False, **_) -> Layout:
    """The original FER2013 CSV: `emotion,pixels,Usage`, one 48x48 greyscale crop per row.

    Usage Training -> train, PublicTest -> val, PrivateTest -> test; emotion 0-6 = anger,
    disgust, fear, happiness, sadness, surprise, neutral. Each crop is written once as a PNG
    under `media_dir/<name>/<split>/` (default `<data dir>/datasets`). Kaggle's variants load
    too: `emotion,pixels` (every row gets `split`), `pixels` alone (unlabelled) and headers with
    spaces (icml_face_data.csv).
    """
    from tqdm import tqdm

    from db.session import data_dir

    table = _fer2013_table(path)
    out = Path(media_dir) if media_dir else data_dir() / "datasets"
    out = out / name
    layout = Layout(label_set=list(BASIC7))
    bar = tqdm(total=table.stat().st_size, desc=f"read {table.name}", unit="B", unit_scale=True,
               disable=not progress)
    with open(table, encoding="utf-8-sig", errors="replace", newline="\n") as f:
        rows = _csv_rows(_lines_with_progress(f, bar), table.name)
        col: dict[str, int] | None = None
        for where, row, problem in rows:
            if problem is not None:
                layout.broken.append((where, problem))
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if col is None:
                header = [h.strip().lower() for h in row]
                if "pixels" in header:
                    col = {h: header.index(h) for h in ("emotion", "pixels", "usage") if h in header}
                    continue
                col = {"emotion": 0, "pixels": 1, "usage": 2}  # no header: the original order
            cell = lambda key: row[col[key]].strip() if key in col and col[key] < len(row) else ""  # noqa: E731
            label = None
            if "emotion" in col:
                code = _int(cell("emotion")) if re.fullmatch(r"\d{1,3}", cell("emotion")) else None
                if code not in FER2013_CODES:
                    layout.broken.append((where, f"emotion {_quote_code(cell('emotion'))} is not 0-6"))
                    continue
                label = FER2013_CODES[code]
            row_split = split or "train"
            usage = cell("usage")
            if "usage" in col:
                row_split = SPLIT_ALIASES.get(usage.lower()) if usage else None
                if row_split is None:
                    layout.broken.append((where, f"Usage {_quote_word(usage)} is not Training, "
                                                 "PublicTest or PrivateTest"))
                    continue
                if split and row_split != split:
                    layout.excluded[f"{row_split} rows (not --split {split})"] += 1
                    continue
            pixels, why = _fer2013_pixels(cell("pixels"))
            if pixels is None:
                layout.broken.append((where, why))
                continue
            try:
                media = _write_png_once(out / row_split, pixels)
            except OSError as exc:
                raise UserError(f"cannot write the FER2013 images under {out}: "
                                f"{exc.strerror or exc}") from None
            meta = {"row": int(where.rsplit(":", 1)[1].split("-")[0]), "aligned": True}
            if label is not None:
                meta["source_label"] = next(k for k, v in FER2013_CODES.items() if v == label)
            if usage:
                meta["usage"] = usage
            layout.entries.append(Entry(where, media, label, row_split, meta))
    bar.close()
    if col is None:
        raise UserError(f"{table}: empty: expected FER2013's 'emotion,pixels,Usage' rows")
    if "pixels" not in col:
        raise UserError(f"{table}: expected a 'pixels' column (FER2013's emotion,pixels,Usage)")
    return layout


READERS: dict[str, Callable[..., Layout]] = {
    "rafdb": read_rafdb, "affectnet": read_affectnet, "ferplus": read_ferplus, "dfew": read_dfew,
    "ferv39k": read_ferv39k, "mafw": read_mafw, "folder": read_folder, "csv": read_csv,
    "fer2013": read_fer2013,
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


def _shown(media: Path) -> str:
    """A media path as a message shows it: its last characters, escaped (the path may be a
    cell of whatever file was imported)."""
    return _quote(str(media), tail=True)


def _check(entry: Entry) -> tuple[str, str]:
    """(modality, content hash) of an entry's media, or MediaError saying what is wrong."""
    from core.media import load_image, probe_video

    media = entry.media
    if not media.exists():
        raise MediaError(f"{_shown(media)}: no such file")
    if media.is_dir():
        if not _frame_count(media):
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
        return entry, None, None, f"{_shown(entry.media)}: unreadable ({type(exc).__name__}: {_quote(exc, 60)[1:-1]})"


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
    if any(_inside(resolved, p) or _inside(p, resolved) for p in private):
        return f"{_shown(entry.media)}: one of the store's own files, not a dataset file"
    if roots is not None and not any(_inside(resolved, root) for root in roots):
        return f"{_shown(entry.media)}: outside the import folders"
    return None


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

    if fmt not in READERS:
        raise UserError(f"unknown format {_quote(fmt)}: choose one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}")
    shown = _clean(path, 200)
    try:
        root = Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):   # a NUL byte, a symlink loop
        raise UserError(f"{shown}: not a usable path") from None
    name = (name or (root.stem if fmt in ("folder", "csv") else fmt)).strip()
    if not re.fullmatch(r"[\w.\-]{1,120}", name):
        raise UserError(f"dataset name {_quote(name, 60)}: use letters, digits, '_', '-' or '.'")
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
    layout = READERS[fmt](root, fold=fold, label_set=label_set, split=split,
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
    summary.broken = [(_clean(where, 120), _clean(reason)) for where, reason in summary.broken]
    summary.notes = [_clean(note) for note in summary.notes]
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
