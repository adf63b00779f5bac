"""Shared fixtures: a fresh SQLite store per test, and a small imported image dataset."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def db_url(tmp_path):
    """A migrated SQLite file under tmp_path (a real file: WAL and locking as in production)."""
    from db.session import dispose_engine, init_db

    url = f"sqlite:///{tmp_path / 'store.db'}"
    init_db(url)
    yield url
    dispose_engine(url)


@pytest.fixture
def fast_passwords(monkeypatch):
    """Cheap argon2 parameters: tests create many users; production keeps the library defaults."""
    from argon2 import PasswordHasher

    from annotation import users

    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def write_png(path, seed: int, size: int = 16):
    """A tiny image whose content (hence hash) depends on `seed`."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def small_dataset(db_url, tmp_path):
    """Dataset "faces": 6 PNGs in a folder-per-class layout (train/test), imported; returns its name."""
    from annotation.importers import import_dataset

    root = tmp_path / "faces"
    for i, (split, label) in enumerate([("train", "happy"), ("train", "sad"), ("train", "angry"),
                                        ("train", "happy"), ("test", "neutral"), ("test", "sad")]):
        write_png(root / split / label / f"{i:03d}.png", seed=i)
    summary = import_dataset("folder", root, "faces", url=db_url, progress=False)
    assert summary.added == 6 and not summary.broken
    return "faces"
