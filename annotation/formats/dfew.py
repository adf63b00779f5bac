"""DFEW: EmoLabel_DataSplit/{train,test}(single-labeled)/set_K.csv + clips (mp4 or frame folders)."""
from __future__ import annotations

import re
from pathlib import Path

from annotation.formats.common import Layout, find
from annotation.formats.folds import HeaderRow, fold_entries, read_fold_lists
from core.errors import UserError
from core.labels import BASIC7

VIDEO = True
DFEW_CODES = {1: "happiness", 2: "sadness", 3: "neutral", 4: "anger", 5: "surprise",
              6: "disgust", 7: "fear"}


def read(root: Path, fold: int = 1, **_) -> Layout:
    """DFEW: `video_name,label` (codes 1-7) in five train/test folds; clips as mp4 or frames."""
    layout = Layout(label_set=list(BASIC7))
    split_dir = find(root, "EmoLabel_DataSplit", want_dir=True)
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
            raise HeaderRow
        code = int(float(cells[1]))
        if code == 0:
            return cells[0], None, {}
        return cells[0], DFEW_CODES[code], {"source_label": code}

    clips = read_fold_lists(files, parse, layout)
    fold_entries(root, clips, layout, fold, skip=[split_dir])
    return layout
