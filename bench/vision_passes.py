"""Vision-tower passes per request, prepared apart (before) vs prepared once (after), and the
engine's throughput at 1 and 8 clients, in one run.

    python bench/vision_passes.py [--requests 24] [--model DIR] [--new-tokens 16]

"Before" is how the engine prepared a request until prepare-once: `model.prepare()` once for the
category prompt and once for the conversation prompt, each through the image processor and the
vision tower (score_labels, then generate). "After" is the engine's path now: `prepare_media()`
once, both prompts built from it, one vision pass shared by scoring and generation. Passes and
images are counted with a forward hook on the tower's embeddings (every tower runs them once per
pass); the model-level time per request is the median of a few runs of each path, side by side.
Inputs: a photo with one face and a 4-frame video of a face (tests/media_files.py), explain=True.
Runs the tiny checkpoint (built into a temp folder unless --model is given) on the CPU, or on a
GPU when there is one.
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

import torch  # noqa: E402

from core.engine import Engine, EngineConfig  # noqa: E402
from core.media import load_media  # noqa: E402
from core.model.recipe import category_question, conversation_question  # noqa: E402
from tests.media_files import face_frames, face_photo, write_image, write_video  # noqa: E402


class PassCounter:
    """Images per vision-tower pass, from a forward hook on the tower's embeddings."""

    def __init__(self, model):
        self.passes: list[int] = []
        self._handle = model.vision.embeddings.register_forward_hook(
            lambda module, args, out: self.passes.append(int(args[0].shape[0])))

    def take(self) -> list[int]:
        passes, self.passes = self.passes, []
        return passes

    def close(self) -> None:
        self._handle.remove()


def model_paths(engine: Engine, media_path: Path, new_tokens: int):
    """The two ways of running one request on the model: (before, after) callables."""
    model = engine._model
    media = load_media(str(media_path), num_frames=engine.config.num_frames)
    faces = engine.faces.analyze_frames(media.frames)
    labels = model.config.label_set
    score_q = category_question(labels, media.kind, model.config)
    text_q = conversation_question(media.kind, model.config)

    def before():
        score_x = model.prepare(media.frames, faces, score_q)
        text_x = model.prepare(media.frames, faces, text_q)
        return model.score_labels([score_x], labels)[0], model.generate([text_x], max_new_tokens=new_tokens)[0]

    def after():
        prepared = model.prepare_media(media.frames, faces)
        score_x, text_x = model.prepare(prepared, faces, score_q), model.prepare(prepared, faces, text_q)
        return model.score_labels([score_x], labels)[0], model.generate([text_x], max_new_tokens=new_tokens)[0]

    return before, after


def timed_pair(first, second, repeats: int = 9) -> tuple[float, float]:
    """Median ms of each, the two alternating (a shared machine moves single runs a lot)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def throughput(engine: Engine, media: Path, clients: int, requests: int) -> tuple[float, float]:
    latencies: list[float] = []

    def one(_):
        start = time.perf_counter()
        engine.predict(media, explain=True)
        latencies.append((time.perf_counter() - start) * 1000)

    engine.predict(media, explain=True)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return requests / elapsed, latencies[int(0.95 * (len(latencies) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--model")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if not model:
        from core.model.build import build_tiny

        model = str(build_tiny(tmp / "tiny"))
    files = {"image, 1 face": write_image(tmp / "face.jpg", face_photo()),
             "video, 4 frames": write_video(tmp / "clip.mp4", face_frames(8), fps=4)}
    engine = Engine(model, EngineConfig(num_frames=4, max_new_tokens=args.new_tokens, max_batch=16,
                                        batch_window_ms=15, preprocess_workers=4, max_queue=256))
    counter = PassCounter(engine._model)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"device {engine.device}, model {engine.info['model_version']}")
    try:
        print(f"{'input':16s} | {'before: passes / images':>24s} | {'after: passes / images':>23s} | "
              f"{'engine':>14s} | {'model ms before':>15s} {'after':>7s} | max |diff|")
        for name, path in files.items():
            before, after = model_paths(engine, path, args.new_tokens)
            counter.take()
            old = before()
            old_passes = counter.take()
            new = after()
            new_passes = counter.take()
            engine.predict(path, explain=True)
            engine_passes = counter.take()
            diff = max(abs(old[0][k] - new[0][k]) for k in old[0])
            assert old[1] == new[1], "prepare-once changed the explanation"
            ms_before, ms_after = timed_pair(before, after)
            counter.take()
            print(f"{name:16s} | {len(old_passes):>12d} / {sum(old_passes):<9d} | {len(new_passes):>11d} / "
                  f"{sum(new_passes):<9d} | {len(engine_passes)} / {sum(engine_passes):<10d} | "
                  f"{ms_before:15.1f} {ms_after:7.1f} | {diff:.1e}")
        counter.close()
        print(f"engine throughput, image with one face, explain=True, {args.requests} requests:")
        single = None
        for clients in (1, 8):
            rps, p95 = throughput(engine, files["image, 1 face"], clients, args.requests)
            single = single or rps
            print(f"  {clients} client(s): {rps:6.1f} req/s ({rps / single:.2f}x one client), p95 {p95:.0f} ms")
        print(f"batch sizes seen: {engine.health()['batch_sizes']}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
