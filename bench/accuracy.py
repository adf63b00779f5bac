"""The embedded default (prior-only mode) on real FER2013 crops, measured as a user gets it.

    python bench/accuracy.py [--data ../shared/data/fer2013/val] [--per-class N] [--json OUT]

For each crop of FER2013's PublicTest split (`val/<class>/*.jpg`, 48x48 greyscale; README in
that folder) three ways of getting a label, side by side:
  network   the prior network (FER2013 mini-Xception) fed the raw crop directly: the ceiling
            the pipeline should reach on crops;
  aligned   core.engine in prior-only mode with aligned=True (the crop is the face: no
            detection, MTCNN's ONet gives the landmarks);
  detected  core.engine in prior-only mode with aligned=False (MTCNN must find the face).
WAR, UAR, per-class recall, the no-face rate (no label: a miss) and milliseconds per image:
`solo` is the latency of one request at a time (what one user waits), `batch` the wall time per
image with 16 requests in flight (what `evaluate` / `predict FOLDER` cost). The engine runs its
default face pipeline, attribute networks included, as it serves.

`--per-class N` takes the first N crops of each class by file name (a stratified subset for a
busy machine); the default is the whole split (3,589 crops). Not a test: numbers for the README.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from annotation.evaluate import report  # noqa: E402
from core.engine import Engine, EngineConfig  # noqa: E402
from core.media import load_image  # noqa: E402

# FER2013's folder names -> the product's canonical labels (core/labels.py).
FER_FOLDERS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness",
               "sad": "sadness", "surprise": "surprise", "neutral": "neutral"}
LABELS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
SOLO = 100  # requests timed one at a time per engine mode


def crops(data: Path, per_class: int | None) -> list[tuple[Path, str]]:
    out = []
    for folder, label in FER_FOLDERS.items():
        files = sorted((data / folder).glob("*.jpg"))
        out += [(f, label) for f in (files[:per_class] if per_class else files)]
    if not out:
        raise SystemExit(f"{data}: no FER2013 crops (<class>/*.jpg) found")
    return out


def metrics(truth: list[str], predicted: list[str | None]) -> dict:
    answered = [(t, p) for t, p in zip(truth, predicted) if p is not None]
    missed = [t for t, p in zip(truth, predicted) if p is None]
    r = report([t for t, _ in answered], [p for _, p in answered], LABELS, unanswered=missed)
    return {"war": r["war"], "uar": r["uar"], "per_class_recall": r["per_class_recall"],
            "no_face": r["unanswered"], "no_face_rate": r["unanswered"] / max(1, r["n"]), "n": r["n"]}


def network_alone(items: list[tuple[Path, str]]) -> dict:
    """The prior network on each raw crop (decoded as the engine decodes), 64 at a time."""
    from core.priors import make_prior

    prior = make_prior("fer2013-mini-xception")
    images = [load_image(path) for path, _ in items]
    started = time.perf_counter()
    predicted = []
    for i in range(0, len(images), 64):
        probs, _ = prior.predict(images[i:i + 64])
        predicted += [prior.labels[int(j)] for j in probs.argmax(axis=1)]
    batch_ms = (time.perf_counter() - started) * 1000 / len(images)
    solo = []
    for image in images[:SOLO]:
        t = time.perf_counter()
        prior.predict([image])
        solo.append((time.perf_counter() - t) * 1000)
    return {**metrics([label for _, label in items], predicted),
            "ms_solo_p50": statistics.median(solo), "ms_batch": batch_ms}


def through_engine(engine: Engine, items: list[tuple[Path, str]], aligned: bool,
                   in_flight: int = 16) -> dict:
    solo = []
    for path, _ in items[:SOLO]:  # one at a time: what one user waits for
        t = time.perf_counter()
        engine.predict(path, explain=False, aligned=aligned)
        solo.append((time.perf_counter() - t) * 1000)
    predicted: list[str | None] = [None] * len(items)
    low_confidence = 0
    waiting: collections.deque = collections.deque()
    todo = iter(enumerate(items))
    started = time.perf_counter()

    def submit() -> None:
        for index, (path, _) in todo:
            waiting.append((index, engine.stream(path, explain=False, aligned=aligned)))
            if len(waiting) >= in_flight:
                return

    submit()
    while waiting:
        index, stream = waiting.popleft()
        result = next(e for e in stream if e["event"] == "done")["result"]
        submit()
        predicted[index] = result["label"]
        low_confidence += "may not be a face" in (result.get("note") or "")
    batch_ms = (time.perf_counter() - started) * 1000 / len(items)
    return {**metrics([label for _, label in items], predicted),
            "low_confidence_notes": low_confidence,
            "ms_solo_p50": statistics.median(solo),
            "ms_solo_p95": sorted(solo)[int(0.95 * (len(solo) - 1))], "ms_batch": batch_ms}


def table(results: dict) -> str:
    names = list(results)
    rows = [("WAR", lambda r: f"{100 * r['war']:.1f}"), ("UAR", lambda r: f"{100 * r['uar']:.1f}"),
            ("no face", lambda r: f"{100 * r['no_face_rate']:.1f} % ({r['no_face']})")]
    rows += [(f"recall {label}", (lambda lbl: lambda r: f"{100 * (r['per_class_recall'][lbl] or 0):.1f}")(label))
             for label in LABELS]
    rows += [("ms/image, one at a time (p50)", lambda r: f"{r['ms_solo_p50']:.1f}"),
             ("ms/image, 16 in flight", lambda r: f"{r['ms_batch']:.1f}")]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {title} | " + " | ".join(fn(results[n]) for n in names) + " |" for title, fn in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013" / "val"))
    parser.add_argument("--per-class", type=int, default=None, help="first N crops of each class")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    items = crops(Path(args.data), args.per_class)
    print(f"{len(items)} FER2013 PublicTest crops from {args.data}; {platform.processor() or platform.machine()}, "
          f"torch threads {__import__('torch').get_num_threads()}", file=sys.stderr)
    results = {}
    started = time.perf_counter()
    results["network on the raw crop"] = network_alone(items)
    print(f"network done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    engine = Engine(None, EngineConfig())
    try:
        engine.predict(items[0][0], explain=False, aligned=True)  # load the networks once
        engine.predict(items[0][0], explain=False, aligned=False)
        results["engine, aligned=True"] = through_engine(engine, items, aligned=True)
        print(f"aligned done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        results["engine, aligned=False"] = through_engine(engine, items, aligned=False)
        print(f"detected done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        pipeline = engine.faces.describe()
    finally:
        engine.close()
    print(table(results))
    print(f"\nn = {len(items)}; face pipeline {pipeline}; "
          f"{time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"n": len(items), "pipeline": pipeline, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
