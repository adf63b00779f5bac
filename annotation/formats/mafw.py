"""MAFW: Train & Test Set/single/no_caption/set_K/{train,test}.txt + data/clips or data/frames."""
from __future__ import annotations

import re
from pathlib import Path

from annotation.formats.common import Layout, find
from annotation.formats.folds import RowProblem, fold_entries, read_fold_lists
from annotation.formats.quoting import quote_word
from core.errors import UserError
from core.labels import MAFW11, normalize_label

VIDEO = True


def read(root: Path, fold: int = 1, **_) -> Layout:
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
            raise RowProblem(f"{quote_word(cells[1])} is not one of MAFW's 11 classes")
        extra = {"description": cells[2]} if len(cells) > 2 and cells[2] else {}
        return cells[0], label, extra

    def with_fold(paths: list[Path]) -> list[tuple[Path, int, str]]:
        return [(p, int(re.sub(r"\D", "", p.parent.name)), p.stem.lower()) for p in paths]

    clips = read_fold_lists(with_fold(plain or captioned), parse, layout)
    if plain and captioned:  # captions add a description to clips already read
        described = read_fold_lists(with_fold(captioned), parse, Layout())
        for key, clip in described.items():
            if key in clips and "description" in clip["extra"]:
                clips[key]["extra"]["description"] = clip["extra"]["description"]
    if not any("description" in c["extra"] for c in clips.values()):
        if find(root, "descriptive_text.xlsx"):
            layout.notes.append("Labels/descriptive_text.xlsx holds clip descriptions; they are "
                                "read from the with_caption split lists, which are missing here")
    fold_entries(root, clips, layout, fold, skip=[p.parent for p in lists])
    return layout
