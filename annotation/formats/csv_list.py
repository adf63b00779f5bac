"""`path,label[,split]` rows (header optional; paths relative to the CSV's folder)."""
from __future__ import annotations

import io
from pathlib import Path

from annotation.formats.common import Entry, Layout, csv_rows, good_rows, split_name
from annotation.formats.quoting import has_control, quote_word
from core.errors import UserError
from core.labels import normalize_label

FILE = True  # the path is the CSV file itself


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
    if "\x00" in text or has_control(text):
        return f"the {what} holds control or undecodable characters"
    return None


def read(path: Path, split: str | None = None, **_) -> Layout:
    """`path,label[,split]` rows; an empty label imports the sample unlabelled.

    Rows without a split cell get `split` (default train).
    """
    layout = Layout()
    if not path.is_file():
        raise UserError(f"{path}: not a CSV file")
    rows = good_rows(csv_rows(io.StringIO(_decode_csv(path)), path.name), layout)
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
            layout.broken.append((where, f"label {quote_word(cell('label'))} is not an expression"))
            continue
        row_split = split_name(cell("split")) if cell("split") else (split or "train")
        if row_split is None:
            layout.broken.append((where, f"split {quote_word(cell('split'))} is not train, val or test"))
            continue
        media = Path(cell("path"))
        media = media if media.is_absolute() else path.parent / media
        layout.entries.append(Entry(where, media, label, row_split, {"file": cell("path")}))
    if not layout.entries and layout.broken:
        layout.notes.append("no row reads as 'path,label[,split]': is this the dataset's CSV?")
    return layout
