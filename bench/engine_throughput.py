"""Engine throughput: dynamic batching on vs off, at 1, 4, 8 and 16 concurrent clients.

    python bench/engine_throughput.py [--requests 48] [--repeats 3] [--model DIR]

Runs the tiny checkpoint (built into a temp folder unless --model is given) on the CPU. For each
task (label scoring only; scoring + generation) and each client count it measures requests/s
and p95 latency with the one-at-a-time engine (max_batch=1) and the batching engine
(max_batch=16), side by side in one run, and prints the ratios. The input is a small 96x96
face-free image so that decoding and face detection (a fixed per-request cost, measured by
bench/faces_cost.py) don't hide the model's cost. Each cell runs `--repeats` times, the two
engines alternating, and reports the median: other work on a shared machine moves single runs a
lot.
"""
from __future__ import annotations

import argparse
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


def run(engine: Engine, media: Path, clients: int, requests: int, explain: bool) -> tuple[float, float]:
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
    return requests / elapsed, latencies[int(0.95 * (len(latencies) - 1))]


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
         repeats: int) -> dict[str, tuple[float, float]]:
    """Median (req/s, p95 ms) per engine over `repeats` alternating runs."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            runs[name].append(run(engine, media, clients, requests, explain))
    return {name: (statistics.median(r for r, _ in rs), statistics.median(p for _, p in rs))
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--model")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
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
               "batched": Engine(model, EngineConfig(max_batch=16, batch_window_ms=15, **common))}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"model {engines['batched'].info['model_version']}, {args.requests} requests per run, "
          f"median of {args.repeats} runs per cell")
    print(f"{'task':10s} {'clients':>7s} | {'req/s 1x1':>9s} {'req/s batch':>11s} {'ratio':>6s} | "
          f"{'p95 ms 1x1':>10s} {'p95 ms batch':>12s}")
    for task, explain in (("scoring", False), ("generation", True)):
        single_client_p95 = None
        for clients in (1, 4, 8, 16):
            medians = cell(engines, media, clients, args.requests, explain, args.repeats)
            (one_rps, one_p95), (bat_rps, bat_p95) = medians["one-at-a-time"], medians["batched"]
            single_client_p95 = single_client_p95 or bat_p95
            print(f"{task:10s} {clients:7d} | {one_rps:9.1f} {bat_rps:11.1f} {bat_rps / one_rps:5.2f}x | "
                  f"{one_p95:10.0f} {bat_p95:12.0f}   (batched p95 / 1-client p95: {bat_p95 / single_client_p95:.2f})")
    model_only(engines["batched"]._model, media)
    for engine in engines.values():
        print(f"batch sizes seen ({engine is engines['batched'] and 'batched' or 'one-at-a-time'}): "
              f"{engine.health()['batch_sizes']}")
        engine.close()


if __name__ == "__main__":
    main()
