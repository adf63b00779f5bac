"""Annotation store throughput on a SQLite file: import rate and submit rate (1 vs 8 threads).

    python bench/store_throughput.py [--images 2000] [--saves 800] [--keep DIR]

Import: a generated RAF-DB-layout folder of small JPEGs (first import, then the idempotent
re-import that only hashes and skips). Submit: `workflow.save` calls (draft then submit, each a
compare-and-swap plus a history row), from 1 thread and from 8 threads (8 annotators), and
`next_record` claims. Everything runs in a temporary folder unless --keep is given.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotation import workflow  # noqa: E402
from annotation.ingest import import_dataset  # noqa: E402
from db.models import User  # noqa: E402
from db.session import init_db, session_scope  # noqa: E402


def make_rafdb(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "Image" / "aligned").mkdir(parents=True)
    (root / "EmoLabel").mkdir()
    lines = []
    for i in range(1, n + 1):
        name = f"train_{i:05d}.jpg"
        pixels = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)  # RAF-DB aligned: 100x100
        Image.fromarray(pixels).save(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"),
                                     quality=90)
        lines.append(f"{name} {1 + i % 7}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")


def add_users(url: str, names: list[str]) -> None:
    # Direct rows: argon2 hashing is deliberately slow and not what this measures.
    with session_scope(url) as s:
        s.add_all(User(name=n, role="annotator", password_hash=None) for n in names)


def timed_saves(url: str, assignments: dict[str, list[int]]) -> tuple[float, int]:
    """Each annotator (one thread each) drafts then submits each of its records."""
    barrier = threading.Barrier(len(assignments) + 1)
    errors: list[Exception] = []

    def run(user: str, sample_ids: list[int]) -> None:
        barrier.wait()
        try:
            for sid in sample_ids:
                first = workflow.save(user, sid, "happiness", "Cheeks raised.", "draft", 0, url=url)
                workflow.save(user, sid, "happiness", "Cheeks raised, lip corners pulled up.",
                              "submitted", first["version"], url=url)
        except Exception as exc:  # surfaced below: a benchmark must not hide failures
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in assignments.items()]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed, 2 * sum(len(v) for v in assignments.values())


def timed_claims(url: str, users: list[str], per_user: int) -> tuple[float, int]:
    barrier = threading.Barrier(len(users) + 1)
    got: list[int] = []

    def run(user: str) -> None:
        barrier.wait()
        for _ in range(per_user):
            record = workflow.next_record(user, "bench", url=url)
            got.append(record["sample_id"])
            workflow.release(user, record["sample_id"], url=url)  # keep the queue full

    threads = [threading.Thread(target=run, args=(u,)) for u in users]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, len(got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--saves", type=int, default=800, help="records submitted per run")
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{work / 'bench.db'}"
        init_db(url)
        make_rafdb(work / "rafdb", args.images)

        rows = []
        start = time.perf_counter()
        summary = import_dataset("rafdb", work / "rafdb", "bench", url=url, progress=False)
        first = time.perf_counter() - start
        assert summary.added == args.images, summary.broken[:3]
        start = time.perf_counter()
        again = import_dataset("rafdb", work / "rafdb", "bench", url=url, progress=False)
        second = time.perf_counter() - start
        assert again.added == 0 and again.skipped == args.images
        rows.append(("import (decode + hash + insert)", args.images / first, "samples/s"))
        rows.append(("re-import (all skipped)", args.images / second, "samples/s"))

        names = [f"a{i}" for i in range(9)]
        add_users(url, names)
        n = min(args.saves, args.images // 2)
        solo, solo_ops = timed_saves(url, {"a0": list(range(1, n + 1))})
        per = n // 8
        multi, multi_ops = timed_saves(url, {names[1 + t]: list(range(n + 1 + t * per, n + 1 + (t + 1) * per))
                                             for t in range(8)})
        rows.append(("save, 1 thread", solo_ops / solo, "saves/s"))
        rows.append(("save, 8 threads (8 annotators)", multi_ops / multi, "saves/s"))
        claim1, c1 = timed_claims(url, ["a0"], 200)
        claim8, c8 = timed_claims(url, names[1:], 25)
        rows.append(("next_record + release, 1 thread", c1 / claim1, "claims/s"))
        rows.append(("next_record + release, 8 threads", c8 / claim8, "claims/s"))

    print(f"SQLite file store, {args.images} images of 100x100, {n} records submitted per run\n")
    print(f"{'operation':<36} {'rate':>10}  unit")
    for name, rate, unit in rows:
        print(f"{name:<36} {rate:>10.0f}  {unit}")
    print(f"\nsave: 8 threads / 1 thread = {rows[3][1] / rows[2][1]:.2f}x  (SQLite serialises writers)")
    print(f"claims: 8 threads / 1 thread = {rows[5][1] / rows[4][1]:.2f}x")
    print(f"re-import / import = {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
