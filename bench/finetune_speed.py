"""Fine-tuning speed and memory on the tiny checkpoint (CPU), with and without gradient
checkpointing, side by side in one run.

    python bench/finetune_speed.py [--steps 10] [--batch 8] [--frames 8] [--rounds 2]

Each variant runs in a fresh subprocess with the trainer's own pieces (annotation.train's
load_model / enable_gradient_checkpointing, the model's masked-answer loss, AdamW).
samples/s: from the median of `--steps` optimizer steps after a warm-up step, best of `--rounds`
alternating runs (other work on the machine only ever slows a step down). Memory: the peak RSS
(VmHWM) reset once the model is loaded and warm, so the number is what the training steps add
(activations, gradients) rather than the import and load peak. `--frames 8` makes each sample
a video-length sequence (8 frames x (1 + content tokens) media tokens).

On a 7B base the numbers that matter are on paper: the script ends with that estimate for
Vicuna-7B + CLIP ViT-L/14-336 (parameter counts from the real model built on the meta device,
activation sizes from Korthikanti et al. 2022). This tiny model's activations are a few MB, so
here checkpointing shows its cost, not its saving.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_run(checkpoint: str, steps: int, batch: int, frames: int, gradient_checkpointing: bool) -> dict:
    import numpy as np
    import torch

    from annotation.train import enable_gradient_checkpointing, load_model
    from core.model.prompt import category_question

    torch.manual_seed(0)
    model = load_model(checkpoint, bf16=False).train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    labels = ["happiness", "sadness", "surprise"]
    rng = np.random.default_rng(0)
    inputs = [model.prepare([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(frames)],
                            [[] for _ in range(frames)], category_question(labels, "video" if frames > 1 else "image"))
              for _ in range(batch)]
    answers = [labels[i % 3] for i in range(batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(inputs, answers).backward()  # warm-up: lazy allocations, optimizer state
    optimizer.step()
    optimizer.zero_grad()
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(inputs, answers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]  # the median step: robust to a busy machine
    return {"samples_per_s": batch / step_s, "train_peak_mb": _rss_mb("VmHWM") - before,
            "rss_mb": before, "tokens_per_sample": int(model.prompt_embeddings(inputs[0]).shape[0])}


VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14)


def paper_estimate(batch: int, seq: int, frames: int) -> list[str]:
    """GPU memory of a LoRA fine-tune of EMO-LLaMA on Vicuna-7B + CLIP ViT-L/14-336, per GPU."""
    import torch
    import transformers

    from core.model.build import build_tiny_tokenizer
    from core.model.config import EmoLlamaConfig
    from core.model.modeling import EmoLlama

    llm, vision = transformers.LlamaConfig(**VICUNA_7B), transformers.CLIPVisionConfig(**CLIP_L14_336)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    with torch.device("meta"):  # real shapes, no weights
        model = EmoLlama.from_configs(EmoLlamaConfig(), llm, vision, build_tiny_tokenizer(), processor)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    h, layers, vocab, gb = llm.hidden_size, llm.num_hidden_layers, llm.vocab_size, 1e9
    weights = frozen * 2 / gb                                   # bf16
    optimizer = trainable * (4 + 4 + 8) / gb                    # fp32 weights + grads + AdamW m, v
    layer_acts = 34 * seq * batch * h / gb                      # bf16, flash attention (no s^2 term)
    plain = layers * layer_acts
    checkpointed = layers * 2 * seq * batch * h / gb + layer_acts  # layer inputs + one layer recomputed
    logits = batch * seq * vocab * 4 * 2 / gb                  # fp32 logits + log-softmax
    patches = (336 // 14) ** 2 + 1
    vision_peak = frames * batch * patches * vision.hidden_size * 2 * 4 / gb  # no_grad: a few live states
    overhead = 1.5                                              # CUDA context, allocator slack
    fixed = weights + optimizer + logits + vision_peak + overhead
    return [f"7B on paper: Vicuna-7B + CLIP ViT-L/14-336, {frozen / 1e9:.2f}B frozen (bf16), "
            f"{trainable / 1e6:.0f}M trainable (LoRA r=16 q/k/v/o + connector, fp32 + AdamW), "
            f"micro-batch {batch} x {seq} tokens ({frames} frames/sample):",
            f"  frozen weights {weights:.1f} GB + trainable/grads/AdamW {optimizer:.1f} GB + logits {logits:.1f} GB"
            f" + vision pass {vision_peak:.1f} GB + CUDA overhead ~{overhead:.1f} GB = {fixed:.1f} GB",
            f"  + activations: {plain:.1f} GB plain -> {fixed + plain:.0f} GB per GPU; "
            f"{checkpointed:.1f} GB with gradient checkpointing -> {fixed + checkpointed:.0f} GB per GPU",
            "  DDP holds all of it on every GPU; ZeRO-2 shards only the trainable state (small here); "
            "FSDP also shards the frozen weights (for bases that do not fit one GPU)."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        checkpoint, gc = args.child.split("|")
        print(json.dumps(one_run(checkpoint, args.steps, args.batch, args.frames, gc == "1")))
        return
    from core.model.build import build_tiny

    checkpoint = str(build_tiny(Path(tempfile.mkdtemp()) / "tiny"))
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate the variants, keep each one's best round
        for gc in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
                                  "--frames", str(args.frames), "--child", f"{checkpoint}|{gc}"],
                                 capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            if gc not in results or run["samples_per_s"] > results[gc]["samples_per_s"]:
                results[gc] = run
    plain, ckpt = results["0"], results["1"]
    print(f"tiny checkpoint, CPU, batch {args.batch} x {args.frames} frame(s) "
          f"({plain['tokens_per_sample']} prompt tokens/sample), {args.steps} steps; "
          f"RSS after loading {plain['rss_mb']:.0f} MB")
    print(f"{'variant':26s} {'samples/s':>10s} {'training peak MB (above loaded)':>32s}")
    for name, r in (("plain", plain), ("gradient checkpointing", ckpt)):
        print(f"{name:26s} {r['samples_per_s']:10.2f} {r['train_peak_mb']:32.1f}")
    print(f"ratio checkpointing / plain: speed {ckpt['samples_per_s'] / plain['samples_per_s']:.2f}x, "
          f"training memory {ckpt['train_peak_mb'] / max(plain['train_peak_mb'], 0.1):.2f}x")
    print()
    print("\n".join(paper_estimate(batch=8, seq=200, frames=16)))


if __name__ == "__main__":
    main()
