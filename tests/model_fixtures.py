"""A tiny EMO-LLaMA checkpoint built once per test session (offline, random weights)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from core.model.build import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")
