"""Engine throughput: one-at-a-time vs static batching vs continuous batching, at 1, 8 and 16 clients.

    python bench/engine_throughput.py [--requests 48] [--repeats 3] [--model DIR] [--scoring]

Runs the tiny checkpoint (built into a temp folder unless --model is given) on the CPU. Three
engines side by side in one run: one-at-a-time (max_batch=1), static batching (max_batch=16,
continuous=False: a request arriving while a batch decodes waits for the whole batch) and
continuous batching (max_batch=16: it joins the running batch at the next decoding step). Each
client sends its next request as soon as its last one is answered (closed loop). For each client
count it prints generation requests/s (and the ratio to one-at-a-time) and p50 / p95 latency (and
their ratio to a lone client: one client on the one-at-a-time engine). `--scoring` adds the same
table for label scoring only (explain=False). The input is a small 96x96 face-free image so that
decoding and face detection (a fixed per-request cost, measured by bench/faces_cost.py) don't
hide the model's cost. Each cell runs `--repeats` times, the engines alternating, and reports the
median: other work on a shared machine moves single runs a lot.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.engine import Engine, EngineConfig  # noqa: E402


def run(engine: Engine, media: Path, clients: int, requests: int, explain: bool) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p95 ms) of `requests` requests from `clients` closed-loop clients."""
    latencies: list[float] = []

    def one(_):
        start = time.perf_counter()
        engine.predict(media, explain=explain)
        latencies.append((time.perf_counter() - start) * 1000)

    engine.predict(media, explain=explain)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    def pct(q: float) -> float:
        return latencies[int(q * (len(latencies) - 1))]

    return requests / elapsed, pct(0.5), pct(0.95)


def model_only(model, media: Path, n: int = 8, repeats: int = 5) -> None:
    """The model's own batching gain, without decoding and face detection in the way."""
    from core.media import load_image
    from core.model.prompt import category_question

    frame = load_image(media)
    inputs = [model.prepare([frame], [[]], category_question(model.config.label_set)) for _ in range(n)]
    labels = model.config.label_set

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        alone = best(lambda: [model.score_labels([x], labels) for x in inputs])
        together = best(lambda: model.score_labels(inputs, labels))
        gen_alone = best(lambda: [model.generate([x], max_new_tokens=16) for x in inputs])
        gen_together = best(lambda: model.generate(inputs, max_new_tokens=16))
    print(f"model only, {n} requests: scoring {n / alone:.0f} -> {n / together:.0f} req/s "
          f"({alone / together:.2f}x); generation {n / gen_alone:.1f} -> {n / gen_together:.1f} req/s "
          f"({gen_alone / gen_together:.2f}x)")


def cell(engines: dict, media: Path, clients: int, requests: int, explain: bool,
         repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median (req/s, p50 ms, p95 ms) per engine over `repeats` alternating runs."""
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            runs[name].append(run(engine, media, clients, requests, explain))
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--model")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,8,16")
    parser.add_argument("--scoring", action="store_true", help="also measure label scoring alone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if not model:
        from core.model.build import build_tiny

        model = str(build_tiny(tmp / "tiny"))
    media = tmp / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(media)
    common = dict(num_frames=1, max_new_tokens=args.new_tokens, preprocess_workers=4, max_queue=256)
    engines = {"one-at-a-time": Engine(model, EngineConfig(max_batch=1, batch_window_ms=0, **common)),
               "static": Engine(model, EngineConfig(max_batch=16, batch_window_ms=15, continuous=False, **common)),
               "continuous": Engine(model, EngineConfig(max_batch=16, batch_window_ms=15, **common))}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, model {engines['continuous'].info['model_version']}, "
          f"{args.new_tokens} new tokens, {args.requests} requests per run, median of {args.repeats} runs per cell")
    tasks = (("scoring", False),) * args.scoring + (("generation", True),)
    for task, explain in tasks:
        print(f"\n{task}: req/s (x one-at-a-time) | p50 ms (x lone) | p95 ms (x lone); "
              f"lone = 1 client, one-at-a-time")
        print(f"{'clients':>7s} | " + " | ".join(f"{name:^38s}" for name in engines))
        lone = None
        for clients in (int(c) for c in args.clients.split(",")):
            medians = cell(engines, media, clients, max(args.requests, 2 * clients), explain, args.repeats)
            if lone is None:
                lone = medians["one-at-a-time"]
            base_rps = medians["one-at-a-time"][0]
            print(f"{clients:7d} | " + " | ".join(
                f"{rps:5.1f} ({rps / base_rps:4.2f}x) {p50:6.0f} ({p50 / lone[1]:4.2f}x) {p95:6.0f} ({p95 / lone[2]:4.2f}x)"
                for rps, p50, p95 in medians.values()), flush=True)
    model_only(engines["continuous"]._model, media)
    for name, engine in engines.items():
        print(f"decode batch size per step ({name}): {engine.health()['batch_sizes']}")
        engine.close()


if __name__ == "__main__":
    main()
