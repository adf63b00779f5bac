"""EMO-LLaMA on released VLM bases (core/model/vlm.py), per family, against transformers itself:
the same logits, label likelihoods and greedy tokens as the base's own forward / generate (FIM
and AGR off), FIM tokens right after the image tokens, fine-tuning, save/load, zero-shot serving,
and the real configs built on the meta device.

    python -m pytest -q tests/test_vlm.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.model.loading import load_model
from core.model.vlm import (FAMILIES, LLAVA_CHAT_TEMPLATE, LLAVA_ONEVISION_CHAT_TEMPLATE, QWEN2_5_VL_CHAT_TEMPLATE,
                            SMOLVLM_CHAT_TEMPLATE, VlmEmoLlama, build_tiny_vlm, build_vlm_checkpoint,
                            vlm_lora_config)

DATA = Path(__file__).parent / "data" / "vlm_configs"
QUESTIONS = ["What is the facial expression?", "Which emotion does the person in this image show, "
             "judging from the brows, the eyes and the mouth?"]
LABELS = ["happiness", "sadness", "neutral", "surprise"]


def _images():
    rng = np.random.default_rng(0)
    # Two sizes: Idefics3 splits them into different tile counts (different image-token counts).
    return [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)]


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "base", request.param)
    reference = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    return request.param, folder, reference, AutoProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    """A checkpoint without FIM and AGR: the base + LoRA with B = 0 answers as the base."""
    out = build_vlm_checkpoint(str(base[1]), tmp_path_factory.mktemp("plain") / "ckpt", fim=False, agr=False)
    return load_model(out)


def _reference_inputs(model, processor, image, question):
    return processor(text=[model._chat(question, 1)], images=[[image]], return_tensors="pt")


def test_logits_equal_the_base_alone_and_in_a_left_padded_batch(base, plain):
    family, _, reference, processor = base
    batch = [plain.prepare([image], [[]], q) for image, q in zip(_images(), QUESTIONS)]
    lengths = [len(x.before_ids) + len(x.after_ids) for x in batch]
    assert lengths[0] != lengths[1]
    assert all(x.before_ids[-1] == plain.image_token_id and plain.image_token_id not in x.after_ids for x in batch)
    embeds, mask = plain._left_pad(plain.batch_prompt_embeddings(batch))
    with torch.no_grad():
        ours = plain._run(embeds, mask).logits
        for row, (image, q) in enumerate(zip(_images(), QUESTIONS)):
            inputs = _reference_inputs(plain, processor, image, q)
            assert inputs["input_ids"][0].tolist() == batch[row].before_ids + batch[row].after_ids
            theirs = reference(**inputs).logits[0]
            torch.testing.assert_close(ours[row, -theirs.shape[0]:], theirs, atol=1e-4, rtol=0)


def test_label_scores_equal_the_likelihood_from_the_base_logits(base, plain):
    _, _, reference, processor = base
    batch = [plain.prepare([image], [[]], q) for image, q in zip(_images(), QUESTIONS)]
    ours = plain.score_labels(batch, LABELS)
    for row, (image, q) in enumerate(zip(_images(), QUESTIONS)):
        inputs = dict(_reference_inputs(plain, processor, image, q))
        prompt = inputs["input_ids"].shape[1]
        means = []
        for label in LABELS:
            answer = plain.answer_ids(label)
            ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
            longer = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "mm_token_type_ids" in inputs:  # Qwen2.5-VL: the answer is text
                longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                         torch.zeros(1, len(answer), dtype=torch.long)], dim=1)
            with torch.no_grad():
                logits = reference(**{**inputs, **longer}).logits[0]
            logprobs = logits[prompt - 1:-1].log_softmax(-1).gather(-1, torch.tensor(answer)[:, None])
            means.append(logprobs.mean())
        expected = torch.stack(means).softmax(-1)
        torch.testing.assert_close(torch.tensor([ours[row][label] for label in LABELS]), expected, atol=1e-4, rtol=0)


def test_greedy_generation_equals_the_base_generate(base, plain):
    _, _, reference, processor = base
    batch = [plain.prepare([image], [[]], q) for image, q in zip(_images(), QUESTIONS)]
    ours = plain.generate(batch, max_new_tokens=8)
    stop = plain.stop_token_ids()
    for text, image, q in zip(ours, _images(), QUESTIONS):
        inputs = _reference_inputs(plain, processor, image, q)
        with torch.no_grad():
            out = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        tokens = []
        for t in out.tolist():
            if t in stop:
                break
            tokens.append(t)
        assert text == plain.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def face_input():
    from core.faces import shared_analyzer
    from tests.media_files import face_photo

    photo = face_photo()
    faces = shared_analyzer().analyze(photo)
    assert faces, "the test photo must show a face"
    return photo, faces


def test_fim_tokens_sit_right_after_the_image_tokens_and_change_the_logits(base, plain, face_input, tmp_path):
    photo, faces = face_input
    fim = load_model(build_vlm_checkpoint(str(base[1]), tmp_path / "fim"))
    assert fim.fim is not None and fim.config.use_agr
    x = fim.prepare([photo], faces, QUESTIONS[0])
    prompt = fim.batch_prompt_embeddings([x])[0]
    k = fim.config.face_tokens
    assert prompt.shape[0] == len(x.before_ids) + k + len(x.after_ids)
    assert x.before_ids[-1] == fim.image_token_id
    cut = len(x.before_ids)
    torch.testing.assert_close(prompt[cut:cut + k], fim.encode_media([x])[0])
    # Without the face tokens, the rest is the plain prompt (with the same AGR sentence).
    plain.config.use_agr = True
    try:
        y = plain.prepare([photo], faces, QUESTIONS[0])
    finally:
        plain.config.use_agr = False
    assert y.before_ids + y.after_ids == x.before_ids + x.after_ids
    assert "The person appears to be" in fim.tokenizer.decode(x.after_ids)
    without = plain.batch_prompt_embeddings([y])[0]
    torch.testing.assert_close(torch.cat([prompt[:cut], prompt[cut + k:]]), without)
    with torch.no_grad():
        a = fim._run(prompt[None], torch.ones(1, prompt.shape[0], dtype=torch.long)).logits[0, -1]
        b = plain._run(without[None], torch.ones(1, without.shape[0], dtype=torch.long)).logits[0, -1]
    assert (a - b).abs().max() > 1e-3


def test_fine_tuning_lowers_the_loss_and_reloads_equal(base, face_input, tmp_path):
    photo, faces = face_input
    model = load_model(build_vlm_checkpoint(str(base[1]), tmp_path / "base"), trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("fim.") for n in trainable)
    assert not any("vision" in n for n in trainable)  # LoRA on the language model only
    batch = [model.prepare([photo], faces, QUESTIONS[0]), model.prepare([_images()[0]], [[]], QUESTIONS[1])]
    answers = ["happiness", "The person looks sad: lowered brows."]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = model(batch, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    saved = model.save_pretrained(tmp_path / "v2", version="v2")
    assert {p.name for p in saved.iterdir()} >= {"config.json", "emo_modules.safetensors", "adapter", "processor"}
    again = load_model(saved)
    assert again.version == "v2" and again.config.vlm == model.config.vlm
    logits = []
    with torch.no_grad():
        for m in (model, again):
            e = m.batch_prompt_embeddings([m.prepare([photo], faces, QUESTIONS[0])])[0][None]
            logits.append(m._run(e, torch.ones(e.shape[:2], dtype=torch.long)).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    # The new version shares the loaded base (its adapter only), and answers as loaded alone;
    # the zero-shot base has no adapters: a version is loaded in full beside it.
    base_model = load_model(tmp_path / "base")
    shared = base_model.load_version(saved)
    assert shared.llm is base_model.llm and shared.version == "v2"
    x = shared.prepare([photo], faces, QUESTIONS[0])
    with torch.no_grad():
        e = shared.batch_prompt_embeddings([x])[0][None]
        torch.testing.assert_close(shared._run(e, torch.ones(e.shape[:2], dtype=torch.long)).logits,
                                   logits[0], atol=1e-5, rtol=0)
    shared.release()
    from core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="built on base"):
        load_model(f"zero-shot:{base[1]}").load_version(saved)


def test_zero_shot_serves_the_base_as_released(base, plain):
    family, folder, reference, processor = base
    model = load_model(f"zero-shot:{folder}")
    assert model.version == f"zero-shot:{Path(folder).resolve()}" and model.config.zero_shot
    assert model.fim is None and not model.config.use_agr and model.config.is_tiny
    assert not hasattr(model.llm, "peft_config")  # no LoRA at all
    x = model.prepare([_images()[0]], [[]], QUESTIONS[0])
    with torch.no_grad():
        e = model.batch_prompt_embeddings([x])[0][None]
        ours = model._run(e, torch.ones(e.shape[:2], dtype=torch.long)).logits[0]
        theirs = reference(**_reference_inputs(model, processor, _images()[0], QUESTIONS[0])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert model.score_labels([x], LABELS) == pytest.approx(plain.score_labels([x], LABELS), abs=1e-5)
    # A video: its frames as that many images in one user turn.
    video = model.prepare(_images(), [[], []], QUESTIONS[0])
    assert video.kind == "video"
    with torch.no_grad():
        e = model.batch_prompt_embeddings([video])[0][None]
        ours = model._run(e, torch.ones(e.shape[:2], dtype=torch.long)).logits[0]
        inputs = processor(text=[model._chat(QUESTIONS[0], 2)], images=[_images()], return_tensors="pt")
        torch.testing.assert_close(ours, reference(**inputs).logits[0], atol=1e-4, rtol=0)


def test_engine_answers_zero_shot_with_its_name(base, tmp_path):
    from core.engine import Engine, EngineConfig
    from tests.media_files import face_photo, write_image

    if base[0] != "llava":
        pytest.skip("one family is enough for the engine path")
    engine = Engine(f"zero-shot:{base[1]}", EngineConfig(num_frames=2, max_new_tokens=4))
    try:
        result = engine.predict(write_image(tmp_path / "face.jpg", face_photo()))
    finally:
        engine.close()
    assert "zero-shot:" in result["model_version"] and result["is_tiny"]
    assert list(result["scores"]) == engine._model.config.label_set
    assert result["label"] == max(result["scores"], key=result["scores"].get)
    assert isinstance(result["explanation"], str)


def test_build_model_from_vlm_command(base, tmp_path, capsys):
    from annotation.versions import version_folder
    from core.model.cli import build_model_command
    from core.model.config import EmoLlamaConfig

    args = argparse.Namespace(tiny=False, from_llamavid=None, from_vlm=str(base[1]), llm=None, vision=None,
                              no_fim=True, no_agr=False, version="b0", out=str(tmp_path / "c"), json=True)
    assert build_model_command(args) == 0
    config = EmoLlamaConfig.load(tmp_path / "c")
    assert config.vlm == str(Path(base[1]).resolve()) and not config.use_fim and config.use_agr
    assert json.loads(capsys.readouterr().out)["version"] == "b0"
    assert version_folder("zero-shot:org/some-vlm") == "zero-shot:org/some-vlm"


def test_released_configs_build_on_the_meta_device(base):
    """The real bases' sizes, offline: LLaVA-1.5-7B, SmolVLM-256M, Qwen2.5-VL-3B, LLaVA-OneVision-0.5B;
    LoRA on their language model only."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = base[0]
    data = json.loads((DATA / f"{family}.json").read_text())
    assert data["chat_template"] == {"llava": LLAVA_CHAT_TEMPLATE, "idefics3": SMOLVLM_CHAT_TEMPLATE,
                                     "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
                                     "llava_onevision": LLAVA_ONEVISION_CHAT_TEMPLATE}[family]
    hf_config = CONFIG_MAPPING[data["config"]["model_type"]](**data["config"])
    from core.model.vlm import vlm_config

    config = vlm_config("org/released")
    with torch.device("meta"):
        vlm = AutoModelForImageTextToText.from_config(hf_config)
        total = sum(p.numel() for p in vlm.parameters())
        model = VlmEmoLlama(config, get_peft_model(vlm, vlm_lora_config(config, vlm)), base[3])
    text = hf_config.text_config
    lora = {n: p.numel() for n, p in model.llm.named_parameters() if "lora_" in n}
    head = text.hidden_size // text.num_attention_heads if not getattr(text, "head_dim", None) else text.head_dim
    kv = text.num_key_value_heads * head
    per_layer = config.lora_r * (4 * text.hidden_size + text.num_attention_heads * head * 2 + kv * 2)
    assert sum(lora.values()) == text.num_hidden_layers * per_layer
    assert not any("vision" in n or "connector" in n or "projector" in n for n in lora)
    low, high, image_token = {"llava": (7.0e9, 7.1e9, 32000), "idefics3": (2.2e8, 2.8e8, 49190),
                              "qwen2_5_vl": (3.7e9, 3.8e9, 151655), "llava_onevision": (0.85e9, 0.95e9, 151646)}[family]
    assert low < total < high and model.image_token_id == image_token
    assert model.fim.out[-1].out_features == text.hidden_size


def test_evaluate_a_zero_shot_version(base, db_url, small_dataset):
    from annotation.evaluate import evaluate_version

    if base[0] != "idefics3":
        pytest.skip("one family is enough for the evaluation path")
    spec = f"zero-shot:{base[1]}"
    result = evaluate_version(spec, small_dataset, "test", url=db_url, num_frames=1)
    assert result["version"] == f"zero-shot:{Path(base[1]).resolve()}" and result["n"] == 2
    assert not result.get("temperature_saved")  # nothing of a released VLM is ever written


def test_trainer_feature_cache_gives_the_same_loss(base, face_input, tmp_path):
    """annotation/train.py caches each sample's frozen features (frozen_features) and hands them
    back through a fresh PreparedMedia, as for a sample from a loader worker."""
    import dataclasses

    from annotation.train import frozen_features, with_media

    photo, faces = face_input
    model = load_model(build_vlm_checkpoint(str(base[1]), tmp_path / "c"), trainable=True)
    x = model.prepare([photo], faces, QUESTIONS[0])
    frames, face_features = frozen_features(model, x)
    assert frames.shape[0] == sum(t == model.image_token_id for t in x.before_ids)
    y = with_media(dataclasses.replace(x, media=None))
    y.media.keep_features(model.vision, model.dtype, frames, face_features)
    with torch.no_grad():
        torch.testing.assert_close(model([y], ["happiness"]), model([x], ["happiness"]))


def test_bad_zero_shot_specs_are_one_line_errors(tmp_path):
    from core.errors import ModelLoadError
    from core.model.build import build_tiny

    for spec, says in ((f"zero-shot:{tmp_path / 'missing'}", "no such VLM"), ("zero-shot:", "names no VLM"),
                       (f"zero-shot:{build_tiny(tmp_path / 'llama')}", "cannot load the VLM")):
        with pytest.raises(ModelLoadError, match=says) as caught:
            load_model(spec)
        assert "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError, match="not trainable"):
        load_model("zero-shot:org/any", trainable=True)
