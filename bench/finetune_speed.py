"""Fine-tuning speed and peak memory on the tiny checkpoint (CPU), with and without gradient
checkpointing, measured side by side in one run.

    python bench/finetune_speed.py [--steps 20] [--batch 6]

Each variant runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(checkpoint: str, steps: int, batch: int, gradient_checkpointing: bool) -> dict:
    import numpy as np
    import torch

    from core.model.modeling import EmoLlama
    from core.model.prompt import category_question

    torch.manual_seed(0)
    model = EmoLlama.from_pretrained(checkpoint, trainable=True)
    if gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    labels = ["happiness", "sadness", "surprise"]
    rng = np.random.default_rng(0)
    inputs = [model.prepare([rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)], [[]], category_question(labels))
              for _ in range(batch)]
    answers = [labels[i % 3] for i in range(batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(inputs, answers).backward()  # warm-up
    optimizer.zero_grad()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(inputs, answers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * batch / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, gc = args.child.split("|")
        print(json.dumps(one_run(checkpoint, args.steps, args.batch, gc == "1")))
        return
    from core.model.build import build_tiny

    checkpoint = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    results = {}
    for gc in ("0", "1"):
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
                              "--child", f"{checkpoint}|{gc}"], capture_output=True, text=True, check=True)
        results[gc] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tiny checkpoint, CPU, batch {args.batch}, {args.steps} steps")
    print(f"{'variant':28s} {'samples/s':>10s} {'peak RSS MB':>12s}")
    for gc, name in (("0", "plain"), ("1", "gradient checkpointing")):
        print(f"{name:28s} {results[gc]['samples_per_s']:10.1f} {results[gc]['peak_rss_mb']:12.0f}")
    print(f"ratio (checkpointing / plain): speed {results['1']['samples_per_s'] / results['0']['samples_per_s']:.2f}x, "
          f"memory {results['1']['peak_rss_mb'] / results['0']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
