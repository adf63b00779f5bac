"""ROOT/<label>/<files or frame folders>, or ROOT/<split>/<label>/... (split folders train/,
val|valid|validation|PublicTest/, test|PrivateTest/, also FER2013Train-style names)."""
from __future__ import annotations

import re
from pathlib import Path

from annotation.formats.common import SPLIT_ALIASES, Entry, Layout, frame_count, is_media, split_name
from annotation.formats.quoting import quote
from core.errors import UserError
from core.labels import normalize_label


def _split_folder(name: str) -> str | None:
    """The split a top-level folder names: train/, validation/, PublicTest/, FER2013Valid/ ..."""
    exact = split_name(name)
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


def read(root: Path, split: str | None = None, **_) -> Layout:
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
                                f"{', '.join(quote(n)[1:-1] for n in others[:5])}")
    else:
        groups = [(split or "train", top)]
    ignored = 0
    for group_split, label_dirs in groups:
        for label_dir in label_dirs:
            label = _folder_label(label_dir.name)
            where = str(label_dir.relative_to(root))
            if label is None:
                layout.broken.append((where, f"folder name {quote(label_dir.name)} is not an expression"))
                continue
            for item in sorted(label_dir.iterdir()):
                if item.is_dir() and frame_count(item):
                    media = item
                elif item.is_file() and is_media(item):
                    media = item
                else:
                    ignored += 1
                    continue
                layout.entries.append(Entry(str(item.relative_to(root)), media, label, group_split,
                                            {"file": str(item.relative_to(root))}))
    if ignored:
        layout.notes.append(f"{ignored} items that are neither media files nor frame folders ignored")
    return layout
