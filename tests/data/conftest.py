"""Fixtures of the data tests (helpers live in datahelpers.py, importable because this folder is on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from datahelpers import hf_processor, tokenizer_dir  # noqa: E402


@pytest.fixture(scope="session")
def tok_dir() -> str:
    return tokenizer_dir()


@pytest.fixture(scope="session")
def hf_proc_factory():
    cache = {}

    def get(min_pixels: int, max_pixels: int):
        key = (min_pixels, max_pixels)
        if key not in cache:
            cache[key] = hf_processor(min_pixels, max_pixels)
        return cache[key]

    return get
