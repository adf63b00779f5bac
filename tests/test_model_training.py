"""The whole path learns: short LoRA runs on toy tasks where one signal decides the expression
(the frame's colour; or only a Face Info Mining clue)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.faces import ARCFACE_TEMPLATE, Face

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


def toy_face(label: str, clue: str, rng: np.random.Generator) -> Face:
    """A hand-built face whose ONLY label signal is one Face Info Mining clue.

    clue="global": the prior embedding points one way per label; clue="local": the mouth region of
    the aligned crop has the label's colour. Everything else is the same for every label.
    """
    labels = list(COLOURS)
    embedding = rng.normal(0, 1, 128).astype(np.float32)
    aligned = np.full((112, 112, 3), 128, np.uint8)
    if clue == "global":
        embedding[labels.index(label) * 8:(labels.index(label) + 1) * 8] += 6.0
    else:  # around the mouth corners of the ArcFace template (41, 92) and (71, 92)
        colour = np.array(COLOURS[label], np.float32) + rng.normal(0, 20, 3)
        aligned[80:106, 30:82] = np.clip(colour, 0, 255).astype(np.uint8)
    return Face(box=(0.0, 0.0, 112.0, 112.0), score=1.0, landmarks=ARCFACE_TEMPLATE.copy(),
                aligned=aligned, embedding=embedding)


@pytest.mark.parametrize("clue", ["global", "local"])
def test_face_info_mining_learns_from_its_clues_alone(tiny_checkpoint, clue):  # noqa: F811
    """The frames are identical grey images: only the FIM clue (prior embedding, or ROI features
    around the mouth) can tell the labels apart, through the aggregator's face tokens."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    labels = list(COLOURS)
    model = EmoLlama.from_pretrained(tiny_checkpoint, trainable=True)
    question = category_question(labels)
    frame = np.full((48, 48, 3), 128, np.uint8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def batch(n: int):
        names = [labels[i % len(labels)] for i in range(n)]
        return [model.prepare([frame], [[toy_face(name, clue, rng)]], question) for name in names], names

    held_out, truth = batch(9)
    model.eval()
    before = model.score_labels(held_out, labels)
    model.train()
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
    assert [max(s, key=s.get) for s in scores] == truth
    assert np.mean([s[t] for s, t in zip(scores, truth)]) > np.mean([s[t] for s, t in zip(before, truth)])
