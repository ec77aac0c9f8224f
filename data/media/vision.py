"""Shared vision geometry for images and videos: smart_resize, the processor's normalization, patchify.

Shape legend: F = frames, C = channels (3), H/W = resized height/width, p = patch size, T = temporal patch,
P = C * T * p * p pixel-row length (1176 at p = 14: Qwen2-VL, Qwen2.5-VL; 1536 at p = 16: Qwen3-VL).

The family's processor facts (model.processing.VisionProcessing: patch / temporal patch / merge sizes, so the
resize factor patch x merge, and the pixel mean / std) come in as `vision`; None means Qwen2-VL's
(`default_vision()`), so callers that name no family keep Qwen2-VL's arithmetic. These are pure functions with
no I/O; data/media/image.py (images) and data/media/video.py (videos) build on them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from model.processing import VisionProcessing
from model.vision import normalize_pixel_rows

MAX_ASPECT_RATIO = 200


class AspectRatioError(ValueError):
    """Aspect ratio above MAX_ASPECT_RATIO: the loader counts such samples as skipped."""


def default_vision() -> VisionProcessing:
    """Qwen2-VL's processor facts (its tiny preset's: every Qwen2-VL preset has the same), the facts of callers that
    name no family."""
    return family_vision("qwen2_vl")


def vision_or_default(vision: VisionProcessing | None) -> VisionProcessing:
    return default_vision() if vision is None else vision


@functools.cache
def family_vision(family: str) -> VisionProcessing:
    """The processor facts of a family by name (its tiny preset's: a family's presets share them), for the command
    lines that name a family but no model; an unknown name is a did-you-mean ValueError."""
    from model.family import get_family, get_preset

    return get_family(family).processing(get_preset(family, "tiny"))


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    clamp_to_factor: bool = True,
) -> tuple[int, int]:
    """Qwen-VL's naive dynamic resolution: sides rounded to multiples of `factor` (the family's patch x merge: 28
    or 32), area within [min_pixels, max_pixels] (default: 4 and 16384 merged tokens, i.e. x factor^2, as
    qwen-vl-utils), aspect ratio kept as closely as possible.

    Same arithmetic as qwen-vl-utils' smart_resize. `clamp_to_factor=False` gives transformers'
    Qwen2VLImageProcessor arithmetic instead, which lacks qwen-vl-utils' max(factor, .) on the first rounding;
    the two differ only when a side is under factor / 2 pixels (e.g. a 512x3 strip: 756x28 vs 504x28).
    """
    min_pixels = 4 * factor * factor if min_pixels is None else min_pixels
    max_pixels = 16384 * factor * factor if max_pixels is None else max_pixels
    if min(height, width) <= 0:
        raise ValueError(f"image has a zero side: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise AspectRatioError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width):.1f} ({height}x{width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if clamp_to_factor:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize(frames_FHWC_u8: np.ndarray, vision: VisionProcessing | None = None) -> np.ndarray:
    """uint8 (F, H, W, C) RGB -> float32 (F, C, H, W), rescaled by 1/255 and normalized with the family's
    mean / std (OpenAI CLIP's for Qwen2-VL and Qwen2.5-VL, 0.5 / 0.5 for Qwen3-VL)."""
    v = vision_or_default(vision)
    x = frames_FHWC_u8.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(v.pixel_mean, dtype=np.float32)) / np.asarray(v.pixel_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _check_sides(H: int, W: int, v: VisionProcessing, what: str) -> None:
    if H % v.factor or W % v.factor:
        raise ValueError(f"{what} size {H}x{W} is not a multiple of {v.factor} ({v.family}'s patch {v.patch_size} "
                         f"x merge {v.merge_size})")


def patchify(frames_FCHW: np.ndarray | torch.Tensor,
             vision: VisionProcessing | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalized frames (F, C, H, W) -> pixel rows (grid_t * grid_h * grid_w, P) and grid (t, h, w).

    An image is one frame and is repeated to fill the temporal patch; a frame count that is not a multiple of the
    temporal patch is padded by repeating the last frame. Row order is transformers' Qwen2-VL order (every family's):
    frame pair, merge window (row-major over the merged grid), the merge x merge patches within the window; each row
    is (C, temporal, patch_h, patch_w) flattened.
    """
    v = vision_or_default(vision)
    x = torch.as_tensor(frames_FCHW, dtype=torch.float32)
    F_, C, H, W = x.shape
    _check_sides(H, W, v, "frame")
    T, m, p = v.temporal_patch_size, v.merge_size, v.patch_size
    if F_ % T:
        x = torch.cat([x, x[-1:].expand(T - F_ % T, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // T, H // p, W // p
    x = x.reshape(gt, T, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, C * T * p * p)
    return rows.contiguous(), (gt, gh, gw)


def image_rows_raw(
    pixels_HWC_u8: np.ndarray,
    vision: VisionProcessing | None = None,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """A resized uint8 RGB image (H, W, C) -> RAW pixel rows (N, C * p * p) uint8, one frame per row.

    What the loader ships for images (see model.vision.normalize_pixel_rows, which rescales, normalizes and adds
    the temporal copy on the device): the same row order as patchify(), an eighth of its bytes. `out`: an optional
    uint8 (N, C*p*p) array to write into (the microbatch's buffer, so nothing is concatenated later).
    """
    v = vision_or_default(vision)
    x = np.asarray(pixels_HWC_u8)
    if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {x.dtype} {x.shape}")
    H, W, C = x.shape
    _check_sides(H, W, v, "image")
    m, p = v.merge_size, v.patch_size
    gh, gw = H // p, W // p
    N = gh * gw
    # (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): merge window, patch in window, (C, ph, pw)
    x_rows = x.reshape(gh // m, m, p, gw // m, m, p, C).transpose(0, 3, 1, 4, 6, 2, 5)
    if out is None:
        out = np.empty((N, C * p * p), dtype=np.uint8)
    if out.shape != (N, C * p * p) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {(N, C * p * p)}, got {out.dtype} {out.shape}")
    np.copyto(out.reshape(gh // m, gw // m, m, m, C, p, p), x_rows)
    return torch.from_numpy(out)


def video_rows_raw(
    frames_FHWC_u8: np.ndarray, vision: VisionProcessing | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resized uint8 frames (F, H, W, C) -> RAW pixel rows (N, C * T * p * p) uint8 and the grid (t, h, w).

    patchify()'s row order and row layout, before rescale/normalize (done on the device by
    model.vision.normalize_pixel_rows); a frame count that is not a multiple of the temporal patch is padded by
    repeating the last frame.
    """
    v = vision_or_default(vision)
    x = torch.from_numpy(np.ascontiguousarray(frames_FHWC_u8))
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 (F, H, W, C) frames, got {x.dtype} {tuple(x.shape)}")
    F_, H, W, C = x.shape
    T, p, m = v.temporal_patch_size, v.patch_size, v.merge_size
    _check_sides(H, W, v, "frame")
    if F_ % T:
        x = torch.cat([x, x[-1:].expand(T - F_ % T, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // T, H // p, W // p
    x = x.reshape(gt, T, gh // m, m, p, gw // m, m, p, C)
    # -> (gt, gh/m, gw/m, m_h, m_w, C, T, p_h, p_w): transformers' row order and row layout
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, C * T * p * p), (gt, gh, gw)


def image_rows_u8(pixels_HWC_u8: np.ndarray, vision: VisionProcessing | None = None) -> torch.Tensor:
    """A resized uint8 RGB image (H, W, C) -> the processor's normalized float32 rows (N, P): image_rows_raw
    followed by the model's normalize_pixel_rows. Same rows as patchify(normalize(image[None]))[0] (< 1e-6)."""
    v = vision_or_default(vision)
    return normalize_pixel_rows(image_rows_raw(pixels_HWC_u8, v), v)
