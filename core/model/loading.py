"""One door for loading a model version, whatever it is built on.

    model = load_model("checkpoints/v3")             # an EMO-LLaMA checkpoint folder or hub id

The engine and evaluation load through here, so a new kind of base is one branch in this file.
"""
from __future__ import annotations

from pathlib import Path

import torch


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantization: str | None = None, trainable: bool = False):
    """The model a version spec names, in eval mode unless `trainable`."""
    from core.model.modeling import EmoLlama

    model = EmoLlama.from_pretrained(spec, device=device, dtype=dtype, trainable=trainable,
                                     quantization=quantization)
    return model if trainable else model.eval()
