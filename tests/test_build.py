"""`build-model --llm ... --vision ...` on real base sizes builds without loading the base.

The base folders here hold only what their hub repositories' config files say (Vicuna-7B,
CLIP ViT-L/14-336) and a tokenizer: no weights exist, so a build that tried to load them fails.
"""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from core.errors import ModelLoadError
from core.model.modeling import EmoLlama


def test_a_7b_base_builds_from_its_configs_alone(tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig

    from core.model.build import build_from_parts, build_tiny_bert_tokenizer, build_tiny_tokenizer
    from core.model.config import EmoLlamaConfig
    from core.model.modeling import MODULES_FILE

    vicuna, clip, bert = tmp_path / "vicuna", tmp_path / "clip", tmp_path / "bert"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(vicuna)
    build_tiny_tokenizer().save_pretrained(vicuna)
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14).save_pretrained(clip)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(clip)
    build_tiny_bert_tokenizer(with_dec=False).save_pretrained(bert)

    out = build_from_parts(str(vicuna), str(clip), tmp_path / "out", bert=str(bert))
    config = EmoLlamaConfig.load(out)
    assert (config.llm, config.vision) == (str(vicuna), str(clip))
    assert not (out / "llm").exists() and not (out / "adapter").exists()
    with safe_open(str(out / MODULES_FILE), "pt") as weights:
        shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
    assert shapes["frame_tokens.mm_projector.2.weight"] == (4096, 4096)
    assert shapes["frame_tokens.bert_proj.weight"] == (1408, 1024)      # CLIP width -> the Q-Former's EVA width
    assert shapes["frame_tokens.val_projector.weight"] == (4096, 1024)
    assert shapes["fim.out.2.weight"] == (4096, 4096)
    assert json.loads((out / "qformer_tokenizer" / "tokenizer_config.json").read_text())["bos_token"] == "[DEC]"
    # Loading is what needs the base's weights: here there are none, and that is a clear error.
    with pytest.raises(ModelLoadError, match="cannot load the checkpoint"):
        EmoLlama.from_pretrained(out)
