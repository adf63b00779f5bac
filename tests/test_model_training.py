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


def test_a_step_on_cached_frozen_features_equals_a_fresh_one(tiny_checkpoint):  # noqa: F811
    """The trainer's feature cache (annotation/train.py): a micro-batch whose frozen vision
    features were computed once (each sample alone, kept on CPU) gives the loss and gradients of
    the plain forward, with no vision-tower pass at all."""
    from annotation.train import FeatureCache, frozen_features, with_media

    rng = np.random.default_rng(2)
    labels = list(COLOURS)
    model = EmoLlama.from_pretrained(tiny_checkpoint, trainable=True).eval()  # eval: no dropout draws
    question = category_question(labels)
    face = toy_face("sadness", "local", rng)
    frames = [[toy_image(name, rng)] for name in labels]
    faces = [[[]], [[face]], [[]]]

    def fresh():
        return [model.prepare(f, fs, question) for f, fs in zip(frames, faces)]

    def loss_and_grads(inputs):
        model.zero_grad()
        loss = model(inputs, labels)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]

    plain_loss, plain_grads = loss_and_grads(fresh())
    cache = FeatureCache()
    for i, x in enumerate(fresh()):
        cache.put(str(i), (with_media(x), labels[i]), *frozen_features(model, x))
    assert len(cache.entries) == 3 and cache.bytes > 0
    cached = []
    for i in range(3):
        (x, _), frame_features, face_features = cache.get(str(i))
        assert frame_features.device.type == "cpu" and face_features.shape[0] == (i == 1)
        x.media.keep_features(model.vision, model.dtype, frame_features.to(model.device),
                              face_features.to(model.device))
        cached.append(x)
    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        cached_loss, cached_grads = loss_and_grads(cached)
    finally:
        hook.remove()
    assert calls == []
    assert abs(cached_loss - plain_loss) < 1e-5
    assert len(cached_grads) == len(plain_grads)
    for a, b in zip(cached_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5)
    for full in (FeatureCache(budget_mb=0), FeatureCache(enabled=False)):  # past the budget, or off
        full.put("x", (cached[0], "a"), *frozen_features(model, cached[0]))
        assert "x" not in full and full.bytes == 0
