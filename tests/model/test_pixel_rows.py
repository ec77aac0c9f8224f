"""Raw uint8 pixel rows (what the loader ships) give the model exactly what transformers' processor gives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.media.vision import image_rows_raw, normalize, patchify, smart_resize, video_rows_raw
from model.config import VisionConfig, tiny
from model.qwen2_vl import Qwen2VL
from model.vision import normalize_pixel_rows


def _resized(img: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    pil = Image.fromarray(img).convert("RGB")
    h, w = smart_resize(pil.height, pil.width, min_pixels=min_pixels, max_pixels=max_pixels)
    return np.asarray(pil.resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_raw_image_rows_normalize_to_the_processor_values(name):
    img = getattr(skdata, name)()
    proc = Qwen2VLImageProcessorPil(min_pixels=8 * 28 * 28, max_pixels=256 * 28 * 28)
    ref = proc(images=[Image.fromarray(img)], return_tensors="pt")
    raw = image_rows_raw(_resized(img, 8 * 28 * 28, 256 * 28 * 28))
    assert raw.dtype == torch.uint8 and raw.shape[1] == 3 * 14 * 14  # one frame: an eighth of float32 rows
    rows = normalize_pixel_rows(raw, VisionConfig())
    assert rows.shape == ref["pixel_values"].shape
    assert float((rows - ref["pixel_values"]).abs().max()) < 1e-5


def test_raw_video_rows_normalize_to_patchify():
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, size=(5, 56, 84, 3), dtype=np.uint8)  # odd count: last frame repeated
    raw, grid = video_rows_raw(frames)
    ref, ref_grid = patchify(normalize(frames))
    assert grid == ref_grid == (3, 4, 6) and raw.dtype == torch.uint8
    assert float((normalize_pixel_rows(raw, VisionConfig()) - ref).abs().max()) < 1e-5


def test_model_output_is_the_same_for_raw_and_processor_rows():
    torch.manual_seed(0)
    model = Qwen2VL(tiny()).eval()
    img = _resized(skdata.coffee(), 4 * 28 * 28, 16 * 28 * 28)
    raw = image_rows_raw(img)
    h, w = img.shape[0] // 14, img.shape[1] // 14
    grid = torch.tensor([[1, h, w]])
    ids = torch.tensor([151644, 10, 151652] + [151655] * (h * w // 4) + [151653, 11, 12])
    common = dict(input_ids=ids, image_grid_thw=grid)
    with torch.no_grad():
        out_raw = model(pixel_values=raw, **common)
        out_float = model(pixel_values=patchify(normalize(img[None]))[0], **common)
    assert float((out_raw - out_float).abs().max()) < 1e-5


def test_bad_raw_row_width_is_an_error():
    with pytest.raises(ValueError, match="wide"):
        normalize_pixel_rows(torch.zeros(4, 100, dtype=torch.uint8), VisionConfig())
