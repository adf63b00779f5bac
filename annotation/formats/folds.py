"""Five-fold video datasets (DFEW, MAFW): train/test list files per fold -> one entry per clip.

Each clip is stored once: `meta["fold"]` is the fold whose test list holds it, and `split` is
"test" for the fold chosen with `fold=` (default 1), "train" otherwise.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from annotation.formats.common import Entry, Layout, clip_key, index_clips, read_text
from annotation.formats.quoting import quote


def read_fold_lists(files: list[tuple[Path, int, str]], parse: Callable[[list[str]], tuple],
                     layout: Layout) -> dict[str, dict]:
    """Clip -> {label, folds where it is test, extra} from five-fold train/test list files."""
    clips: dict[str, dict] = {}
    for path, fold, kind in sorted(files, key=lambda f: (f[1], f[2], str(f[0]))):
        text = read_text(path)
        dialect_comma = "," in text.split("\n", 1)[0]
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cells = [c.strip() for c in (line.split(",") if dialect_comma else line.split(None, 2))]
            where = f"{path.parent.name}/{path.name}:{number}"
            try:
                name, label, extra = parse(cells)
            except HeaderRow:
                continue
            except RowProblem as exc:  # our own message, cells already quoted
                layout.broken.append((where, str(exc)))
                continue
            except (ValueError, IndexError, KeyError) as exc:
                # Not the exception's text: int("...") would repeat the whole cell.
                layout.broken.append((where, f"unreadable row {quote(line.strip())} "
                                             f"({type(exc).__name__})"))
                continue
            if label is None:
                layout.excluded["not single-labelled"] += 1
                continue
            key = clip_key(name)
            clip = clips.setdefault(key, {"name": name, "label": label, "test_folds": set(),
                                          "where": where, "extra": {}})
            if clip["label"] != label:
                layout.broken.append((where, f"clip {quote(name)[1:-1]} is {label} here but "
                                             f"{clip['label']} in {clip['where']}"))
                clip["conflict"] = True
            if kind == "test":
                clip["test_folds"].add(fold)
            clip["extra"].update(extra)
    return clips


class HeaderRow(Exception):
    pass


class RowProblem(ValueError):
    """A row a split-list parser rejects, with a message safe to show."""


def fold_entries(root: Path, clips: dict[str, dict], layout: Layout, fold: int,
                  skip: Iterable[Path]) -> None:
    on_disk = index_clips(root, skip)
    for key, clip in sorted(clips.items(), key=lambda kv: kv[1]["where"]):
        if clip.get("conflict"):
            continue
        media = on_disk.get(key)
        if media is None:
            layout.broken.append((clip["where"], f"clip {quote(clip['name'])[1:-1]} not found "
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
