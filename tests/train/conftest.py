"""Fixtures for the training tests: the demo's real-data sample set, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """DEMO_DIR with data/ (shards of the three stages + tokenizer), as `python -m train.demo` makes it."""
    from train.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data", n_digits=64, samples_per_shard=32)
    return root
