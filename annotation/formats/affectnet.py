"""AffectNet: Manually_Annotated_file_lists/{training,validation}.csv + Manually_Annotated_Images/."""
from __future__ import annotations

import io
import re
from pathlib import Path

from annotation.formats.common import Entry, Layout, csv_rows, find, good_rows, read_text, to_int
from annotation.formats.quoting import has_control, quote_code
from core.errors import UserError
from core.labels import LABEL_SETS, WITH_CONTEMPT8
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear",
                   5: "disgust", 6: "anger", 7: "contempt"}
AFFECTNET_NOT_EXPRESSIONS = {8: "none", 9: "uncertain", 10: "no-face"}


def read(root: Path, label_set: str | None = None, **_) -> Layout:
    """AffectNet manual annotations; validation.csv is the usual test set."""
    labels = LABEL_SETS.get(label_set or "affectnet8")
    if labels is None or not set(labels) <= set(WITH_CONTEMPT8):
        raise UserError("AffectNet label set must be affectnet8 (with contempt) or basic7")
    layout = Layout(label_set=list(labels))
    images = find(root, "Manually_Annotated_Images", want_dir=True) or root
    files = [(name, split) for name, split in (("training.csv", "train"), ("validation.csv", "test"))
             if find(root, name)]
    if not files:
        raise UserError(f"{root}: no training.csv or validation.csv (Manually_Annotated_file_lists)")
    for name, split in files:
        path = find(root, name)
        rows = good_rows(csv_rows(io.StringIO(read_text(path)), name), layout)
        header = [h.strip().lower() for h in rows[0][1]] if rows else []
        has_header = "expression" in header
        col_path = header.index("subdirectory_filepath") if "subdirectory_filepath" in header else 0
        col_expr = header.index("expression") if has_header else 6
        for where, row in rows[1:] if has_header else rows:
            if not row or not any(cell.strip() for cell in row):
                continue
            code = to_int(row[col_expr]) if len(row) > col_expr else None
            if code in AFFECTNET_NOT_EXPRESSIONS:
                layout.excluded[f"code {code} ({AFFECTNET_NOT_EXPRESSIONS[code]})"] += 1
                continue
            if code not in AFFECTNET_CODES:
                layout.broken.append((where, f"expression code {quote_code(row[col_expr] if len(row) > col_expr else '')} is not 0-10"))
                continue
            label = AFFECTNET_CODES[code]
            if label not in labels:
                layout.excluded[f"{label} (not in {label_set})"] += 1
                continue
            if col_path >= len(row) or not row[col_path].strip() or has_control(row[col_path]):
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
