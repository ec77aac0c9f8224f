"""Raw uint8 pixel rows (what the loader ships) give the model exactly what the family's transformers processor gives
it (Qwen2-VL, Qwen2.5-VL: 14-pixel patches, OpenAI CLIP mean / std; Qwen3-VL: 16-pixel patches, 0.5 / 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.media.vision import family_vision, image_rows_raw, normalize, patchify, smart_resize, video_rows_raw
from model.family import get_preset
from model.vision import normalize_pixel_rows
from model.vlm import VLModel


def _resized(img: np.ndarray, factor: int, min_tokens: int, max_tokens: int) -> np.ndarray:
    pil = Image.fromarray(img).convert("RGB")
    h, w = smart_resize(pil.height, pil.width, factor, min_tokens * factor**2, max_tokens * factor**2)
    return np.asarray(pil.resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_raw_image_rows_normalize_to_the_processor_values(name, family):
    v = family_vision(family)
    img = getattr(skdata, name)()
    proc = Qwen2VLImageProcessorPil(min_pixels=8 * v.factor**2, max_pixels=256 * v.factor**2, patch_size=v.patch_size,
                                    merge_size=v.merge_size, image_mean=list(v.pixel_mean), image_std=list(v.pixel_std))
    ref = proc(images=[Image.fromarray(img)], return_tensors="pt")
    raw = image_rows_raw(_resized(img, v.factor, 8, 256), v)
    assert raw.dtype == torch.uint8 and raw.shape[1] == 3 * v.patch_size**2  # one frame: an eighth of float32 rows
    rows = normalize_pixel_rows(raw, v)
    assert rows.shape == ref["pixel_values"].shape
    assert float((rows - ref["pixel_values"]).abs().max()) < 1e-5


def test_raw_video_rows_normalize_to_patchify(family):
    v = family_vision(family)
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, size=(5, 2 * v.factor, 3 * v.factor, 3), dtype=np.uint8)  # odd: last frame repeated
    raw, grid = video_rows_raw(frames, v)
    ref, ref_grid = patchify(normalize(frames, v), v)
    assert grid == ref_grid == (3, 4, 6) and raw.dtype == torch.uint8
    assert float((normalize_pixel_rows(raw, v) - ref).abs().max()) < 1e-5


def test_model_output_is_the_same_for_raw_and_processor_rows(family):
    v = family_vision(family)
    torch.manual_seed(0)
    model = VLModel(get_preset(family, "tiny")).eval()
    img = _resized(skdata.coffee(), v.factor, 4, 16)
    raw = image_rows_raw(img, v)
    h, w = img.shape[0] // v.patch_size, img.shape[1] // v.patch_size
    grid = torch.tensor([[1, h, w]])
    ids = torch.tensor([151644, 10, 151652] + [151655] * (h * w // 4) + [151653, 11, 12])
    common = dict(input_ids=ids, image_grid_thw=grid)
    with torch.no_grad():
        out_raw = model(pixel_values=raw, **common)
        out_float = model(pixel_values=patchify(normalize(img[None], v), v)[0], **common)
    assert float((out_raw - out_float).abs().max()) < 1e-5


def test_bad_raw_row_width_is_an_error(family):
    with pytest.raises(ValueError, match="wide"):
        normalize_pixel_rows(torch.zeros(4, 100, dtype=torch.uint8), family_vision(family))
