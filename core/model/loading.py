"""One door for loading a model version, whatever it is built on.

    model = load_model("checkpoints/v3")             # an EMO-LLaMA checkpoint folder or hub id
    model = load_model("zero-shot:HuggingFaceTB/SmolVLM-256M-Instruct")   # a VLM as released
    EMO_VLLM_URL=http://gpu-box:8000/v1: any spec -> a client of that vLLM server (core/model/remote.py)

The engine and evaluation load through here, so a new kind of base is one branch in this file.
A checkpoint built on a VLM (`build-model --from-vlm`) says so in its config.json (`vlm`) and
loads through EmoLlama.from_pretrained like any other.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantization: str | None = None, trainable: bool = False):
    """The model a version spec names, in eval mode unless `trainable`."""
    if os.environ.get("EMO_VLLM_URL") and not trainable:
        # Served by a vLLM server: the spec is the name it serves (core/model/remote.py).
        from core.model.remote import OpenAIChatModel

        return OpenAIChatModel.from_environment(str(spec))
    from core.model.config import zero_shot_id
    from core.model.vlm import VlmEmoLlama

    vlm = zero_shot_id(spec)
    if vlm is not None:
        if trainable:
            from core.errors import ModelLoadError

            raise ModelLoadError(f"{spec}: a zero-shot model is not trainable; build a checkpoint first: "
                            f"`python app.py build-model --from-vlm {vlm} --out DIR`")
        return VlmEmoLlama.zero_shot(vlm, device=device, dtype=dtype, quantization=quantization)
    from core.model.modeling import EmoLlama

    model = EmoLlama.from_pretrained(spec, device=device, dtype=dtype, trainable=trainable,
                                     quantization=quantization)
    return model if trainable else model.eval()
