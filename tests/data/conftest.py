"""Fixtures of the data tests (helpers live in datahelpers.py, importable because this folder is on sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from datahelpers import hf_processor, tokenizer_dir  # noqa: E402

from model.family import FAMILY_NAMES  # noqa: E402


@pytest.fixture(scope="session")
def tok_dir() -> str:
    return tokenizer_dir()


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    """Each model family in turn (the loader is built with its processor facts)."""
    return request.param


@pytest.fixture
def vision(family):
    """The family's processor facts (model.processing.VisionProcessing)."""
    from data.media.vision import family_vision

    return family_vision(family)


@pytest.fixture(scope="session")
def hf_proc_factory():
    cache = {}

    def get(min_pixels: int, max_pixels: int, family: str = "qwen2_vl"):
        key = (min_pixels, max_pixels, family)
        if key not in cache:
            cache[key] = hf_processor(min_pixels, max_pixels, family)
        return cache[key]

    return get
