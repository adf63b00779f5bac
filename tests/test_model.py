"""EMO-LLaMA on a tiny checkpoint: shapes, token budget, gradients, save/load, scoring, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ModelLoadError
from core.faces import Attributes, shared_analyzer
from core.labels import parse_label
from core.model.config import EmoLlamaConfig
from core.model.modeling import EmoLlama
from core.model.prompt import agr_sentence, category_question, split_prompt
from tests.media_files import face_photo
from tests.model_fixtures import tiny_checkpoint  # noqa: F401  (fixture)

QUESTION = "What is the facial expression of the person in the image?"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # noqa: F811
    return EmoLlama.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def face_input(model):
    photo = face_photo()
    return photo, shared_analyzer().analyze(photo)


def test_agr_sentence_template():
    assert agr_sentence(Attributes(age="30-39", gender="female", race="East Asian")) == \
        "The person appears to be a 30-39 year old East Asian woman."
    assert agr_sentence(Attributes(age="20-29", gender="male", race="Black")) == \
        "The person appears to be a 20-29 year old Black man."
    assert agr_sentence(None) == ""


def test_agr_sentence_reaches_the_prompt_only_when_known(model):
    attrs = Attributes(age="30-39", gender="female", race="East Asian")
    _, after = split_prompt(model.tokenizer, QUESTION, attrs)
    assert "30-39 year old East Asian woman" in after
    _, after = split_prompt(model.tokenizer, QUESTION, None)
    assert "appears to be" not in after


def test_parse_label_maps_synonyms():
    assert parse_label("The person looks happy, cheeks raised") == "happiness"
    assert parse_label("Angry: lowered brows") == "anger"
    assert parse_label("contemptuous smirk", ["neutral", "happiness"]) is None
    assert parse_label("nothing to see") is None


def test_token_budget_for_images_and_videos(model, face_input):
    photo, faces = face_input
    config = model.config
    image = model.prepare([photo], [faces], QUESTION)
    video = model.prepare([photo] * 6, [faces] * 6, QUESTION)
    no_face = model.prepare([photo] * 6, [[]] * 6, QUESTION)
    assert model.media_embeddings(image).shape[0] == config.visual_token_budget(1) == 2 + config.face_tokens
    assert model.media_embeddings(video).shape[0] == config.visual_token_budget(6)
    assert model.media_embeddings(no_face).shape[0] == config.visual_token_budget(6, with_face=False)
    full = model.prompt_embeddings(video)
    assert full.shape == (len(video.before_ids) + config.visual_token_budget(6) + len(video.after_ids),
                          model.llm.get_input_embeddings().embedding_dim)


def test_gradients_reach_trainable_parts_only(tiny_checkpoint, face_input):  # noqa: F811
    model = EmoLlama.from_pretrained(tiny_checkpoint, trainable=True)
    photo, faces = face_input
    batch = [model.prepare([photo], [faces], QUESTION), model.prepare([photo] * 3, [faces, [], faces], QUESTION)]
    loss = model(batch, ["happiness", "sadness"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert any("lora_" in n for n in grads)
    assert any(n.startswith("frame_tokens.context_proj") for n in grads)
    assert any(n.startswith("frame_tokens.qformer") for n in grads)
    assert any(n.startswith("fim.local_proj") for n in grads) and any(n.startswith("fim.layers") for n in grads)
    assert not any(n.startswith("vision.") for n in grads)
    frozen_llm = [n for n, p in model.llm.named_parameters() if "lora_" not in n]
    assert frozen_llm and not any(model.llm.get_parameter(n).requires_grad for n in frozen_llm)


def test_save_load_round_trip_gives_identical_logits(model, face_input, tmp_path):
    photo, faces = face_input
    x = model.prepare([photo], [faces], QUESTION)
    with torch.no_grad():
        before = model.score_labels([x], model.config.label_set)[0]
    folder = model.save_pretrained(tmp_path / "copy")
    again = EmoLlama.from_pretrained(folder)
    with torch.no_grad():
        after = again.score_labels([again.prepare([photo], [faces], QUESTION)], again.config.label_set)[0]
    assert before == pytest.approx(after, abs=1e-6)
    assert (folder / "adapter" / "adapter_config.json").exists()
    assert EmoLlamaConfig.load(folder).is_tiny


def test_score_labels_is_a_distribution_that_matches_direct_likelihoods(model, face_input):
    photo, faces = face_input
    labels = model.config.label_set
    x = model.prepare([photo], [faces], category_question(labels))
    scores = model.score_labels([x], labels)[0]
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    direct = {}
    prompt = model.prompt_embeddings(x)
    with torch.no_grad():
        for label in labels:  # one sequence at a time, no padding: an independent computation
            ids = model.answer_ids(label)
            embeds = torch.cat([prompt, model._embed_ids(ids)])[None]
            logits = model.llm(inputs_embeds=embeds).logits[0].log_softmax(-1)
            start = prompt.shape[0] - 1
            direct[label] = float(sum(logits[start + i, t] for i, t in enumerate(ids)))
    assert max(scores, key=scores.get) == max(direct, key=direct.get)
    expected = torch.tensor(list(direct.values())).softmax(0).tolist()
    assert list(scores.values()) == pytest.approx(expected, abs=1e-4)


def test_batched_inference_equals_solo(model, face_input):
    photo, faces = face_input
    inputs = [model.prepare([photo], [faces], QUESTION),
              model.prepare([photo] * 4, [faces, [], faces, faces], "Describe the face in detail please."),
              model.prepare([np.zeros((40, 40, 3), np.uint8)], [[]], QUESTION)]
    together = model.score_labels(inputs, model.config.label_set)
    for x, batched in zip(inputs, together):
        alone = model.score_labels([x], model.config.label_set)[0]
        assert list(batched.values()) == pytest.approx(list(alone.values()), abs=1e-4)
    assert model.generate(inputs, max_new_tokens=6) == [model.generate([x], max_new_tokens=6)[0] for x in inputs]


def test_generate_streams_pieces_that_add_up(model, face_input):
    photo, faces = face_input
    x = model.prepare([photo], [faces], QUESTION)
    pieces: list[str] = []
    (text,) = model.generate([x], max_new_tokens=8, on_text=lambda i, p: pieces.append(p))
    assert "".join(pieces).strip() == text


def test_missing_or_broken_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint"):
        EmoLlama.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        EmoLlama.from_pretrained(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "emo-llama", "llm": "llm", "vision": "vision"}')
    with pytest.raises(ModelLoadError, match="cannot load"):
        EmoLlama.from_pretrained(tmp_path / "bad")


def test_real_base_model_configs_fit_the_design():
    """The loader's assumptions checked on the paper's real parts, by config only (no download)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    clip_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14)
    vicuna_7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, vocab_size=32000)
    config = EmoLlamaConfig()
    assert (clip_336.image_size // clip_336.patch_size) ** 2 == 576  # patches the Q-Former reads
    from core.model.face_mining import FaceInfoMining
    from core.model.vision import FrameTokens

    frame = FrameTokens(config, clip_336.hidden_size, vicuna_7b.hidden_size)
    with torch.device("meta"):
        fim = FaceInfoMining(config, clip_336.hidden_size, vicuna_7b.hidden_size)
    with torch.no_grad():
        out = frame(torch.randn(2, 576, 1024), torch.randn(2, 12, 4096), torch.ones(2, 12, dtype=torch.long))
    assert out.shape == (2, 1 + config.content_tokens, 4096)
    assert fim.local_proj.in_features == 1024 and fim.out[-1].out_features == 4096
    assert fim.global_proj.in_features == 128  # the mini-Xception embedding
    assert config.visual_token_budget(1) == 10 and config.visual_token_budget(16) == 40
