"""What the face pipeline costs per image on this CPU (median of repeated runs).

    python bench/faces_cost.py [--runs 20]

Prints the median and p90 of detection+alignment+prior for one 512x512 photo with one face,
the same photo with no face, and the prior network alone on a batch of 8 crops.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.faces import shared_analyzer  # noqa: E402
from tests.media_files import face_photo, no_face_photo  # noqa: E402


def timed(fn, runs: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    analyzer = shared_analyzer()
    face, empty = face_photo(), no_face_photo()
    crops = [analyzer.analyze(face)[0].aligned] * 8
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{'case':40s} {'median ms':>10s} {'p90 ms':>8s}")
    for name, fn in [("analyze 512x512, one face", lambda: analyzer.analyze(face)),
                     ("analyze 400x600, no face", lambda: analyzer.analyze(empty)),
                     ("prior network only, batch of 8 crops", lambda: analyzer.prior.predict(crops))]:
        median, p90 = timed(fn, args.runs)
        print(f"{name:40s} {median:10.1f} {p90:8.1f}")


if __name__ == "__main__":
    main()
