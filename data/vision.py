"""Shared vision geometry for images and videos: Qwen2-VL's smart_resize, CLIP normalization, patchify.

Shape legend: F = frames, C = channels (3), H/W = resized height/width, P = 3 * 2 * 14 * 14 pixel-row length.

These are pure functions with no I/O; data/image.py (images) and data/video.py (videos) build on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# CLIP mean / std (OpenAI), as Qwen2-VL's processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


# Rescale + normalize folded into one multiply-add per channel: (v / 255 - mean) / std = v * a + b.
_NORM_A = np.asarray([1.0 / (255.0 * s) for s in CLIP_STD], dtype=np.float32)
_NORM_B = np.asarray([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=np.float32)
_NORM_A_T = torch.from_numpy(_NORM_A).view(1, 3, 1, 1)
_NORM_B_T = torch.from_numpy(_NORM_B).view(1, 3, 1, 1)


def image_rows_u8(
    pixels_HWC_u8: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """A resized uint8 RGB image (H, W, C) -> normalized pixel rows (N, P) float32, in patchify()'s row order.

    Same rows as patchify(normalize(image[None]))[0] (to float32 rounding, < 1e-6), several times faster: the
    uint8 image is rearranged first (1 byte per value, numpy), converted and normalized once (torch), and the
    temporal copy (an image is one frame repeated) is a broadcast into the output. `out`: an optional float32
    (N, P) array to write the rows into (the microbatch's pixel_values, so nothing is concatenated later).
    """
    x = np.asarray(pixels_HWC_u8)
    if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {x.dtype} {x.shape}")
    H, W, C = x.shape
    if H % (patch_size * merge_size) or W % (patch_size * merge_size):
        raise ValueError(f"image size {H}x{W} is not a multiple of {patch_size * merge_size}")
    m, p, T = merge_size, patch_size, temporal_patch_size
    gh, gw = H // p, W // p
    N, q = gh * gw, p * p
    # (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): merge window, patch in window, (C, ph, pw)
    x_NCq = np.ascontiguousarray(x.reshape(gh // m, m, p, gw // m, m, p, C).transpose(0, 3, 1, 4, 6, 2, 5))
    f_NC1q = torch.from_numpy(x_NCq).view(N, C, 1, q).float().mul_(_NORM_A_T).add_(_NORM_B_T)
    if out is None:
        out = np.empty((N, C * T * q), dtype=np.float32)
    if out.shape != (N, C * T * q) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(N, C * T * q)}, got {out.dtype} {out.shape}")
    out_t = torch.from_numpy(out)
    out_t.view(N, C, T, q).copy_(f_NC1q.expand(N, C, T, q))
    return out_t
