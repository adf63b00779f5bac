"""The whole path learns: a short LoRA run on a toy task where the colour decides the expression."""
from __future__ import annotations

import numpy as np
import torch

from core.model.modeling import EmoLlama
from core.model.prompt import category_question
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

COLOURS = {"happiness": (220, 40, 40), "sadness": (40, 40, 220), "surprise": (40, 200, 40)}


def toy_image(label: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOURS[label], dtype=np.float32)
    noise = rng.normal(0, 25, (48, 48, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_lora_training_learns_a_toy_task(tiny_checkpoint):  # noqa: F811
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = list(COLOURS)
    model = EmoLlama.from_pretrained(tiny_checkpoint, trainable=True)
    question = category_question(labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def batch(n: int):
        names = [labels[i % len(labels)] for i in range(n)]
        return [model.prepare([toy_image(name, rng)], [[]], question) for name in names], names

    held_out, truth = batch(9)
    losses = []
    for _ in range(40):
        inputs, answers = batch(6)
        loss = model(inputs, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    model.eval()
    scores = model.score_labels(held_out, labels)
    predicted = [max(s, key=s.get) for s in scores]
    assert predicted == truth
