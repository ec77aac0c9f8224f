"""Shared vision geometry for images and videos: Qwen2-VL's smart_resize, CLIP normalization, patchify.

Shape legend: F = frames, C = channels (3), H/W = resized height/width, P = 3 * 2 * 14 * 14 pixel-row length.

These are pure functions with no I/O; data/media/image.py (images) and data/media/video.py (videos) build on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from model.config import VisionConfig
from model.vision import PIXEL_MEAN, PIXEL_STD, normalize_pixel_rows

# CLIP mean / std (OpenAI), as Qwen2-VL's processor; one definition, in the model that consumes the rows.
CLIP_MEAN = PIXEL_MEAN
CLIP_STD = PIXEL_STD

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
MAX_ASPECT_RATIO = 200
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 16384 * 28 * 28


class AspectRatioError(ValueError):
    """Aspect ratio above MAX_ASPECT_RATIO: the loader counts such samples as skipped."""


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    clamp_to_factor: bool = True,
) -> tuple[int, int]:
    """Qwen2-VL's naive dynamic resolution: sides rounded to multiples of `factor`, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    Same arithmetic as qwen-vl-utils' smart_resize. `clamp_to_factor=False` gives transformers'
    Qwen2VLImageProcessor arithmetic instead, which lacks qwen-vl-utils' max(factor, .) on the first rounding;
    the two differ only when a side is under factor / 2 pixels (e.g. a 512x3 strip: 756x28 vs 504x28).
    """
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


def normalize(frames_FHWC_u8: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, C) RGB -> float32 (F, C, H, W), rescaled by 1/255 and CLIP-normalized."""
    x = frames_FHWC_u8.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def patchify(
    frames_FCHW: np.ndarray | torch.Tensor,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalized frames (F, C, H, W) -> pixel rows (grid_t * grid_h * grid_w, P) and grid (t, h, w).

    An image is one frame and is repeated to fill the temporal patch; an odd frame count is padded by
    repeating the last frame. Row order is transformers' Qwen2-VL order: frame pair, merge window (row-major
    over the merged grid), the merge_size x merge_size patches within the window; each row is
    (C, temporal, patch_h, patch_w) flattened.
    """
    x = torch.as_tensor(frames_FCHW, dtype=torch.float32)
    F_, C, H, W = x.shape
    if H % (patch_size * merge_size) or W % (patch_size * merge_size):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {patch_size * merge_size}")
    if F_ % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(temporal_patch_size - F_ % temporal_patch_size, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // temporal_patch_size, H // patch_size, W // patch_size
    m, p = merge_size, patch_size
    x = x.reshape(gt, temporal_patch_size, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(gt * gh * gw, C * temporal_patch_size * patch_size * patch_size)
    return rows.contiguous(), (gt, gh, gw)


def image_rows_raw(
    pixels_HWC_u8: np.ndarray,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """A resized uint8 RGB image (H, W, C) -> RAW pixel rows (N, C * p * p) uint8, one frame per row.

    What the loader ships for images (see model.vision.normalize_pixel_rows, which rescales, normalizes and adds
    the temporal copy on the device): the same row order as patchify(), an eighth of its bytes. `out`: an optional
    uint8 (N, C*p*p) array to write into (the microbatch's buffer, so nothing is concatenated later).
    """
    x = np.asarray(pixels_HWC_u8)
    if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {x.dtype} {x.shape}")
    H, W, C = x.shape
    if H % (patch_size * merge_size) or W % (patch_size * merge_size):
        raise ValueError(f"image size {H}x{W} is not a multiple of {patch_size * merge_size}")
    m, p = merge_size, patch_size
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
    frames_FHWC_u8: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resized uint8 frames (F, H, W, C) -> RAW pixel rows (N, C * T * p * p) uint8 and the grid (t, h, w).

    patchify()'s row order and row layout, before rescale/normalize (done on the device by
    model.vision.normalize_pixel_rows); an odd frame count is padded by repeating the last frame.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames_FHWC_u8))
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 (F, H, W, C) frames, got {x.dtype} {tuple(x.shape)}")
    F_, H, W, C = x.shape
    T, p, m = temporal_patch_size, patch_size, merge_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} is not a multiple of {p * m}")
    if F_ % T:
        x = torch.cat([x, x[-1:].expand(T - F_ % T, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // T, H // p, W // p
    x = x.reshape(gt, T, gh // m, m, p, gw // m, m, p, C)
    # -> (gt, gh/m, gw/m, m_h, m_w, C, T, p_h, p_w): transformers' row order and row layout
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, C * T * p * p), (gt, gh, gw)


def image_rows_u8(
    pixels_HWC_u8: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> torch.Tensor:
    """A resized uint8 RGB image (H, W, C) -> the processor's normalized float32 rows (N, P): image_rows_raw
    followed by the model's normalize_pixel_rows. Same rows as patchify(normalize(image[None]))[0] (< 1e-6)."""
    cfg = VisionConfig(patch_size=patch_size, temporal_patch_size=temporal_patch_size, spatial_merge_size=merge_size)
    return normalize_pixel_rows(image_rows_raw(pixels_HWC_u8, patch_size, merge_size), cfg)
