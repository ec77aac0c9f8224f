"""Video test fixtures (helpers live in video_clips.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from model.family import FAMILY_NAMES  # noqa: E402


@pytest.fixture(params=FAMILY_NAMES)
def vision(request):
    """Each model family's processor facts in turn (Qwen2-VL / Qwen2.5-VL: factor 28; Qwen3-VL: 32)."""
    from data.media.vision import family_vision

    return family_vision(request.param)
