"""FERPlus: fer2013new.csv (10 votes -> majority label) + FER2013{Train,Valid,Test}/."""
from __future__ import annotations

import io
from pathlib import Path

from annotation.formats.common import Entry, Layout, csv_rows, find, good_rows, read_text
from annotation.formats.quoting import has_control, quote
from core.errors import UserError
from core.labels import WITH_CONTEMPT8
FERPLUS_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
FERPLUS_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}


def read(root: Path, **_) -> Layout:
    """FERPlus: majority of 10 votes; ties, unknown and not-a-face majorities are left out."""
    layout = Layout(label_set=list(WITH_CONTEMPT8))
    table = find(root, "fer2013new.csv")
    if table is None:
        raise UserError(f"{root}: no fer2013new.csv found: is this FERPlus?")
    folders = {split: find(root, name, want_dir=True) or table.parent / name
               for split, name in FERPLUS_FOLDERS.items()}
    rows = good_rows(csv_rows(io.StringIO(read_text(table)), table.name), layout)
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
        if has_control(name) or "/" in name or "\\" in name:
            layout.broken.append((where, f"image name {quote(name)} is not a file name"))
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
