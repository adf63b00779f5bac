"""FERV39k: 4_setups/All_scenes/{train,test}_All.csv + 2_ClipsforFaceCrop/<scene>/<label>/<clip>/."""
from __future__ import annotations

from pathlib import Path

from annotation.formats.common import Entry, Layout, find, read_text
from annotation.formats.quoting import quote, quote_word
from core.errors import UserError
from core.labels import BASIC7, normalize_label
from core.media import VIDEO_EXTENSIONS

VIDEO = True


def read(root: Path, **_) -> Layout:
    """FERV39k: `Scene/Label/0001 Label` lines in {train,test}_All.csv; clips are frame folders."""
    layout = Layout(label_set=list(BASIC7))
    lists = {split: find(root, f"{split}_All.csv") for split in ("train", "test")}
    if not any(lists.values()):
        raise UserError(f"{root}: no 4_setups/All_scenes/train_All.csv or test_All.csv: is this FERV39k?")
    clip_roots = [p for p in (root / "2_ClipsforFaceCrop" / "2_ClipsforFaceCrop",
                              root / "2_ClipsforFaceCrop") if p.is_dir()]
    found = find(root, "2_ClipsforFaceCrop", want_dir=True)
    clip_roots += [found] if found else []
    clip_roots.append(root)
    for split, path in lists.items():
        if path is None:
            layout.notes.append(f"no {split}_All.csv: no {split} split")
            continue
        for number, line in enumerate(read_text(path).splitlines(), 1):
            where = f"{path.name}:{number}"
            cells = line.replace(",", " ").split()
            if not cells:
                continue
            if len(cells) < 2:
                layout.broken.append((where, f"expected '<clip path> <label>', got {quote(line.strip())}"))
                continue
            label = normalize_label(cells[-1])
            if label is None:
                if number == 1 and not any(Path(r, cells[0]).exists() for r in clip_roots):
                    continue  # a header row
                layout.broken.append((where, f"{quote_word(cells[-1])} is not an expression"))
                continue
            rel = cells[0].strip("/")
            media = next((Path(r, rel) for r in clip_roots if Path(r, rel).exists()), None)
            if media is None:
                media = next((Path(r, rel + ext) for r in clip_roots for ext in sorted(VIDEO_EXTENSIONS)
                              if Path(r, rel + ext).exists()), None)
            if media is None:
                layout.broken.append((where, f"clip {quote(rel)[1:-1]} not found under {root}"))
                continue
            layout.entries.append(Entry(where, media, label, split,
                                        {"clip": rel, "scene": rel.split("/")[0]}))
    return layout
