"""The original fer2013.csv (emotion,pixels,Usage): each row's 48x48 pixels are written once as
a PNG under <data dir>/datasets/<name>/<split>/."""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

from annotation.formats.common import SPLIT_ALIASES, Entry, Layout, csv_rows, find, to_int
from annotation.formats.quoting import quote_code, quote_word
from core.errors import UserError
from core.labels import BASIC7

FILE = True  # the path may be the CSV file itself
FER2013_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness", 5: "surprise",
                 6: "neutral"}
FER2013_SIDE = 48


def _fer2013_table(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("fer2013.csv", "icml_face_data.csv"):
        found = find(path, name)
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
        return None, f"pixel value {quote_code(bad)} is not a whole number"
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


def read(path: Path, split: str | None = None, media_dir: Path | None = None,
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
        rows = csv_rows(_lines_with_progress(f, bar), table.name)
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
                code = to_int(cell("emotion")) if re.fullmatch(r"\d{1,3}", cell("emotion")) else None
                if code not in FER2013_CODES:
                    layout.broken.append((where, f"emotion {quote_code(cell('emotion'))} is not 0-6"))
                    continue
                label = FER2013_CODES[code]
            row_split = split or "train"
            usage = cell("usage")
            if "usage" in col:
                row_split = SPLIT_ALIASES.get(usage.lower()) if usage else None
                if row_split is None:
                    layout.broken.append((where, f"Usage {quote_word(usage)} is not Training, "
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
