"""The paper's kind of results table: several model versions side by side on dataset splits.

    python app.py table --dataset rafdb,fer2013 --split test --versions prior-only,v3,zero-shot:ID
    python app.py table --dataset rafdb --versions prior-only,v3 --out reports/t1 --json

    from annotation.table import compare_versions
    table = compare_versions(["prior-only", "v3"], ["rafdb"], "test")
    print(table["markdown"])

Each (version, dataset) cell is one `annotation.evaluate.evaluate_version` run (prior-only,
registered versions, checkpoint folders and `zero-shot:ID` specs all go through it, unchanged).
Rows are models, columns UAR and WAR per dataset (in %), the best of each column in bold. A
version that fails to evaluate gets its one-line error in its row; the others still run. The
files: table.md (the Markdown), table.png (a grouped bar plot) and table.json (every number),
in `out` (default `<data dir>/reports/tables/<time>`). In the web app it runs as a job (kind
"table", annotation/jobs.py) from the Fine-tune tab's "Compare versions".
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from core.errors import UserError

METRICS = ("uar", "war")
SPLITS = ("train", "val", "test")
# (cells done, cells in all, what runs now): one cell is one version on one dataset.
Progress = Callable[[int, int, str], None]


def _names(value: str | list[str] | tuple, what: str) -> list[str]:
    """A comma-separated string or a list -> the names, in order, each once."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = list(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))
    if not names:
        raise UserError(f"name at least one {what}")
    return names


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


def compare_versions(versions: str | list[str], datasets: str | list[str], split: str = "test",
                     url: str | None = None, out: str | Path | None = None,
                     num_frames: int | None = None, progress: Progress | None = None) -> dict:
    """Evaluate every version on every dataset's `split` and write the table's files.

    Returns dict(versions, datasets, split, rows, best, markdown, files): `rows` one per version,
    {"version", "error", "cells": {dataset: {"uar", "war", "n"} | {"error"}}}; `best`
    {dataset: {metric: value}}; `files` {"markdown", "png", "json"}: their paths.
    """
    from annotation.evaluate import evaluate_version
    from db.session import data_dir

    versions, datasets = _names(versions, "version"), _names(datasets, "dataset")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    rows, total = [], len(versions) * len(datasets)
    for v_index, version in enumerate(versions):
        cells = {}
        for d_index, dataset in enumerate(datasets):
            done = v_index * len(datasets) + d_index
            if progress:
                progress(done, total, f"{version} on {dataset}/{split}")
            try:
                report = evaluate_version(version, dataset, split, url=url, num_frames=num_frames)
                cells[dataset] = {"uar": report["uar"], "war": report["war"], "n": report["n"]}
            except Exception as exc:  # noqa: BLE001 - one version's failure is its row's, not the table's
                cells[dataset] = {"error": _one_line(exc)}
        errors = {d: c["error"] for d, c in cells.items() if "error" in c}
        # One error for every dataset (a bad name, a broken checkpoint): said once for the row.
        error = (next(iter(errors.values())) if len(set(errors.values())) == 1 and len(errors) == len(datasets)
                 else "; ".join(f"{d}: {e}" for d, e in errors.items()) or None)
        rows.append({"version": version, "error": error, "cells": cells})
    if progress:
        progress(total, total, "done")
    best = {d: {m: max((r["cells"][d][m] for r in rows if m in r["cells"][d]), default=None)
                for m in METRICS} for d in datasets}
    table = {"versions": versions, "datasets": datasets, "split": split, "rows": rows, "best": best}
    table["markdown"] = markdown(table)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(out) if out else data_dir() / "reports" / "tables" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    files = {"markdown": folder / "table.md", "png": folder / "table.png", "json": folder / "table.json"}
    files["markdown"].write_text(table["markdown"] + "\n", encoding="utf-8")
    save_bar_plot(table, files["png"])
    table["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(table, indent=2, ensure_ascii=False), encoding="utf-8")
    return table


def _cell(value: float | None, best: float | None) -> str:
    if value is None:
        return "—"
    text = f"{100 * value:.2f}"
    # Ties are all bold: equal numbers are equally best.
    return f"**{text}**" if best is not None and round(value, 6) == round(best, 6) else text


def _escape(text: str) -> str:
    """Table-safe text: no column breaks, no line breaks, no HTML."""
    return re.sub(r"[|<>\n\r]", lambda m: {"|": "\\|", "<": "&lt;", ">": "&gt;"}.get(m.group(), " "), text)


def markdown(table: dict) -> str:
    """Rows = models, columns = UAR / WAR (%) per dataset, the best of each column in bold,
    and a last column with the row's error when it has one."""
    datasets, split = table["datasets"], table["split"]
    head = ["Model"] + [f"{d} {m.upper()}" for d in datasets for m in METRICS] + ["Note"]
    lines = ["| " + " | ".join(_escape(h) for h in head) + " |",
             "|" + "---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in table["rows"]:
        values = [_cell(row["cells"][d].get(m), table["best"][d][m]) for d in datasets for m in METRICS]
        note = f"error: {_escape(row['error'])}" if row["error"] else ""
        lines.append("| " + " | ".join([_escape(row["version"]), *values, note]) + " |")
    # The sample count of each dataset split, from any version that was scored on it.
    sizes = {d: next((r["cells"][d]["n"] for r in table["rows"] if "n" in r["cells"][d]), "?")
             for d in datasets}
    counts = ", ".join(f"{d} n={n}" for d, n in sizes.items())
    lines.append("")
    lines.append(f"UAR / WAR in % on the {split} split ({counts}); best per column in bold.")
    return "\n".join(lines)


def save_bar_plot(table: dict, path: str | Path) -> Path:
    """Grouped bars: one group per (dataset, metric), one bar per version that has a number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from annotation.calibration import save_figure

    groups = [(d, m) for d in table["datasets"] for m in METRICS]
    rows = table["rows"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(groups) + 0.4 * len(rows)), 3.6))
    x = np.arange(len(groups))
    for i, row in enumerate(rows):
        heights = [100 * row["cells"][d].get(m, np.nan) for d, m in groups]
        label = row["version"] + (" (failed)" if row["error"] else "")
        ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=label)
    ax.set_xticks(x, [f"{d}\n{m.upper()}" for d, m in groups])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{table['split']} split")
    ax.legend(fontsize=8, loc="upper right")
    return save_figure(fig, path)


def table_command(args) -> int:
    """`python app.py table ...`: print the Markdown (or the JSON) and where the files are."""
    import sys

    from db.session import init_db

    init_db()

    def progress(done: int, total: int, stage: str) -> None:
        if not args.json and done < total:   # stderr: stdout is the table alone
            print(f"[{done + 1}/{total}] {stage}", file=sys.stderr, flush=True)

    table = compare_versions(args.versions, args.dataset, args.split, out=args.out,
                             num_frames=args.frames, progress=progress)
    if args.json:
        print(json.dumps(table, indent=2, ensure_ascii=False))
    else:
        print(table["markdown"])
        print(f"\nfiles: {table['files']['markdown']}, {table['files']['png']}, "
              f"{table['files']['json']}", file=sys.stderr)
    # Failed only when no cell has a number.
    return 0 if any("uar" in c for r in table["rows"] for c in r["cells"].values()) else 1
