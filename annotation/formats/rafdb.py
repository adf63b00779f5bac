"""RAF-DB basic: EmoLabel/list_patition_label.txt + Image/aligned (preferred) or Image/original."""
from __future__ import annotations

import os
from pathlib import Path

from annotation.formats.common import Entry, Layout, find, read_text, to_int
from annotation.formats.quoting import quote
from core.errors import UserError
from core.labels import BASIC7
RAFDB_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger",
               7: "neutral"}


def read(root: Path, **_) -> Layout:
    """RAF-DB basic: `train_00001.jpg 5` lines; aligned images preferred when present."""
    layout = Layout(label_set=list(BASIC7))
    label_file = find(root, "list_patition_label.txt") or find(root, "list_partition_label.txt")
    if label_file is None:
        raise UserError(f"{root}: no EmoLabel/list_patition_label.txt found: is this RAF-DB basic?")
    aligned = find(root, "aligned", want_dir=True)
    original = find(root, "original", want_dir=True)
    if aligned is None and original is None:
        raise UserError(f"{root}: no Image/aligned or Image/original folder found")
    for number, line in enumerate(read_text(label_file).splitlines(), 1):
        where = f"{label_file.name}:{number}"
        if not line.strip():
            continue
        parts = line.split()
        code = to_int(parts[1]) if len(parts) == 2 else None
        if code not in RAFDB_CODES:
            layout.broken.append((where, f"expected '<image> <code 1-7>', got {quote(line.strip())}"))
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
