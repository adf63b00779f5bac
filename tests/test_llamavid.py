"""LLaMA-VID as EMO-LLaMA's foundation: conversion of a release, and equality with its inference.

A tiny release in LLaMA-VID's own layout and key names (tests/llamavid_reference.py) is converted
by `build-model --from-llamavid`; with FIM and AGR off the converted checkpoint must give the
reference's pixels, prompt ids, media tokens and greedy answer. Real LLaMA-VID-7B sizes are
checked on the meta device.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.model.llamavid import convert_llamavid
from tests.llamavid_reference import IMAGE_TOKEN_INDEX, ReferenceLlamaVid, build_tiny_release

QUESTION = "What is the facial expression of the person in the image? Describe the brows and mouth."


@pytest.fixture(scope="module")
def release_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamavid")
    build_tiny_release(root)
    return root


@pytest.fixture(scope="module")
def converted(release_root):
    """Converted from the release's working directory, so its relative paths resolve as in LLaMA-VID."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(release_root)
        report = convert_llamavid("release", release_root / "converted", fim=False, agr=False)
    return release_root / "converted", report


@pytest.fixture(scope="module")
def reference(release_root):
    return ReferenceLlamaVid(release_root)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def test_every_key_is_converted_or_reported(converted):
    out, report = converted
    assert report["unknown"] == []
    assert report["ignored"] == {"the Q-Former's position_ids buffer (rebuilt)": 1,
                                 "the shards' copy of the vision tower (EVA comes from its own file)": 1}
    # LLM 2 layers x 9 + embed + norm + lm_head = 21; Q-Former, query, ln, 3 projectors, mm_projector.
    assert report["consumed"] == 124
    assert report["eva_blocks"] == 2 and all(k.startswith("blocks.2.") for k in report["eva_not_built"])
    assert len(report["eva_not_built"]) == 13
    assert report["resized_vocab"][1] == report["resized_vocab"][0] + 1   # <im_patch>
    assert json.loads((out / "conversion_report.json").read_text())["consumed"] == 124
    config = json.loads((out / "config.json").read_text())
    assert config["use_fim"] is False and config["use_agr"] is False
    assert config["template"] == "llava_v1" and config["content_tokens"] == 1
    assert (config["num_text_queries"], config["qformer_layers"], config["qformer_cross_attention_frequency"],
            config["qformer_encoder_width"]) == (4, 3, 2, 176)


def test_converted_checkpoint_answers_exactly_as_llamavid(converted, reference, image):
    from core.model.modeling import EmoLlama

    out, _ = converted
    model = EmoLlama.from_pretrained(out)
    x = model.prepare([image], [[]], QUESTION)
    expected = reference.answer(image, QUESTION, max_new_tokens=12)
    assert torch.equal(x.pixel_values, expected["pixels"])
    assert x.before_ids + [IMAGE_TOKEN_INDEX] + x.after_ids == expected["prompt_ids"]
    assert x.before_ids[0] == model.tokenizer.bos_token_id and model.tokenizer.bos_token_id not in x.after_ids
    with torch.no_grad():
        media = model.media_embeddings(x)
    assert media.shape == (2, 64)
    torch.testing.assert_close(media, expected["media"], atol=1e-4, rtol=1e-4)
    assert model.generate([x], max_new_tokens=12) == [expected["text"]]
    assert len(expected["tokens"]) > 3


def test_the_question_steers_the_context_token_in_word_order(converted):
    """The Q-Former reads the instruction with positions: reversed words give another token."""
    from core.model.modeling import EmoLlama

    model = EmoLlama.from_pretrained(converted[0])
    frame = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    words = "is the person smiling or frowning".split()
    with torch.no_grad():
        forward = model.media_embeddings(model.prepare([frame], [[]], " ".join(words)))
        backward = model.media_embeddings(model.prepare([frame], [[]], " ".join(reversed(words))))
    assert not torch.allclose(forward[0], backward[0], atol=1e-4)    # context token
    torch.testing.assert_close(forward[1], backward[1])              # content token: the image only


def test_predict_from_the_command_line_gives_the_reference_answer(converted, reference, image, tmp_path, capsys):
    from PIL import Image

    from app import main

    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    code = main(["predict", str(path), "--model", str(converted[0]), "--question", QUESTION,
                 "--max-new-tokens", "12", "--greedy", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["explanation"] == reference.answer(image, QUESTION, max_new_tokens=12)["text"]
    assert result["model_version"].startswith("llamavid-")


def test_with_fim_the_converted_parts_are_unchanged_and_fim_is_new(release_root, converted):
    from safetensors.torch import load_file

    from core.model.modeling import MODULES_FILE

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(release_root)
        report = convert_llamavid("release", release_root / "with-fim")
    assert report["fim"] is True
    plain = load_file(converted[0] / MODULES_FILE)
    full = load_file(release_root / "with-fim" / MODULES_FILE)
    assert {k for k in full if not k.startswith("fim.")} == set(plain)
    assert all(torch.equal(full[k], v) for k, v in plain.items())
    assert any(k.startswith("fim.") for k in full)


def test_a_grid_compress_type_gives_grid_content_tokens(tmp_path):
    build_tiny_release(tmp_path, compress_type="grid:2")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        report = convert_llamavid("release", tmp_path / "out", fim=False)
    assert report["content_tokens"] == 4


@pytest.mark.parametrize("damage, message", [
    ("no_eva", "the EVA-ViT-g weights file is missing: ./model_zoo/LAVIS/eva_vit_g.pth (pass --eva FILE)"),
    ("no_index", "the weights index is missing"),
    ("no_processor", "the CLIP image processor is missing"),
    ("foreign", "not a LLaMA-VID release"),
    ("no_shard", "the shard pytorch_model-00002-of-00002.bin that the index lists is missing"),
])
def test_a_missing_part_or_foreign_layout_is_a_one_line_error(release_root, tmp_path, damage, message):
    root = tmp_path / "copy"
    shutil.copytree(release_root, root, ignore=shutil.ignore_patterns("converted", "with-fim"))
    release = root / "release"
    if damage == "no_eva":
        (root / "model_zoo" / "LAVIS" / "eva_vit_g.pth").unlink()
    elif damage == "no_index":
        (release / "pytorch_model.bin.index.json").unlink()
    elif damage == "no_processor":
        shutil.rmtree(root / "llamavid")
    elif damage == "foreign":
        config = json.loads((release / "config.json").read_text())
        del config["mm_vision_tower"]
        (release / "config.json").write_text(json.dumps(config))
    elif damage == "no_shard":
        (release / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        with pytest.raises(UserError) as error:
            convert_llamavid("release", root / "out")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_flags_override_the_paths_the_release_names(release_root, tmp_path):
    moved = tmp_path / "weights" / "eva.pth"
    moved.parent.mkdir()
    shutil.copy(release_root / "model_zoo" / "LAVIS" / "eva_vit_g.pth", moved)
    report = convert_llamavid(str(release_root / "release"), tmp_path / "out", eva=str(moved),
                              bert=str(release_root / "bert-base-uncased"),
                              processor=str(release_root / "llamavid" / "processor" / "clip-patch14-224"))
    assert report["consumed"] == 124


# LLaMA-VID-7B's real sizes, by config only: Vicuna-7B, EVA-ViT-g (39 of 40 blocks, 1408 wide,
# 16 heads, MLP 6144), bert-base Q-Former (768, 12 layers, cross-attention every 2nd, 30523 ids).
def test_a_real_llamavid_7b_builds_on_the_meta_device_with_real_widths_and_names():
    from transformers import InstructBlipVisionConfig, LlamaConfig

    from core.model.build import build_tiny_bert_tokenizer, build_tiny_tokenizer
    from core.model.config import EmoLlamaConfig
    from core.model.llamavid import FRAME_TOKEN_KEYS, QFORMER_PREFIX, route
    from core.model.modeling import EmoLlama

    llm_config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    eva = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                   num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6)
    config = EmoLlamaConfig(template="llava_v1", vision_select_layer=-1, use_fim=False, use_agr=False)
    with torch.device("meta"):
        model = EmoLlama.from_configs(config, llm_config, eva, build_tiny_tokenizer(), None,
                                      build_tiny_bert_tokenizer())
    per_block = 4 * 1408 + (3 * 1408 * 1408 + 3 * 1408) + (1408 * 1408 + 1408) + (1408 * 6144 + 6144) + (6144 * 1408 + 1408)
    embeddings = 1408 + 1408 * 3 * 14 * 14 + 1408 + 257 * 1408
    assert sum(p.numel() for p in model.vision.parameters()) == embeddings + 39 * per_block + 2 * 1408
    frame = model.frame_tokens
    shapes = {name: tuple(p.shape) for name, p in frame.state_dict().items()}
    assert shapes["query"] == (1, 32, 768) and shapes["ln.weight"] == (1408,) and frame.bert_proj is None
    assert shapes["encoder.embeddings.word_embeddings.weight"] == (30523, 768)
    assert shapes["encoder.encoder.layer.0.crossattention.attention.key.weight"] == (768, 1408)
    assert "encoder.encoder.layer.1.crossattention.attention.key.weight" not in shapes
    assert shapes["projector.weight"] == (1408, 768) and shapes["key_projector.weight"] == (1408, 1408)
    assert shapes["val_projector.weight"] == (4096, 1408) and shapes["mm_projector.2.weight"] == (4096, 4096)
    # Every LLaMA-VID connector name routes onto one of these, and every one of these is reached.
    theirs = [QFORMER_PREFIX + "embeddings.LayerNorm.weight", QFORMER_PREFIX + "embeddings.word_embeddings.weight",
              QFORMER_PREFIX + "encoder.layer.0.attention.self.query.weight",
              QFORMER_PREFIX + "encoder.layer.0.crossattention.self.key.weight",
              QFORMER_PREFIX + "encoder.layer.11.output_query.LayerNorm.bias"]
    theirs += [k.rstrip(".") if k.endswith("query") else k + "weight" for k in FRAME_TOKEN_KEYS
               if "bert_proj" not in k]
    theirs = [k.replace("mm_projector.weight", "mm_projector.0.weight") for k in theirs]
    for key in theirs:
        kind, name = route(key)
        assert kind == "modules" and name.removeprefix("frame_tokens.") in shapes, key
    assert model.token_budget("video", 16)["media"] == 32
