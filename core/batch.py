"""The packed microbatch: the one contract between the loader (data/), the engine (parallel/) and the loop (train/).

Shape legend: T = packed tokens, S = samples packed together, N = ViT patch rows, P = 3 * 2 * p * p at the family's
patch size p (1176 at 14: Qwen2-VL, Qwen2.5-VL; 1536 at 16: Qwen3-VL).

A microbatch holds S whole samples back to back (no padding between them, no cross-sample attention):

    input_ids      (T,)    int64   token ids; vision blocks hold grid_t*grid_h*grid_w/4 pad tokens each
    labels         (T,)    int64   ALREADY SHIFTED: labels[t] is the token predicted at position t, i.e.
                                   input_ids[t+1] when that token is supervised, else -100. The last position
                                   of every sample is -100 (nothing follows it within the sample).
    position_ids   (3, T)  int64   M-RoPE (temporal, height, width) ids, restarting at 0 for every sample
                                   (the family's model.processing.VisionProcessing.position_ids)
    cu_seqlens     (S+1,)  int32   sample boundaries, cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen     int             longest sample
    pixel_values   (N_img, P/2) uint8 | (N_img, P) float  image patch rows, images in placeholder order
    image_grid_thw (I, 3)  int64   one (1, h/p, w/p) row per image, placeholder order
    pixel_values_videos (N_vid, P) uint8 | float           video patch rows, videos in placeholder order
    video_grid_thw (K, 3)  int64   one (frames/2, h/p, w/p) row per video
    sample_keys    list[str]       "<shard>/<key>" of each packed sample, in order

Pixel rows come in one of two encodings, both in transformers' Qwen2-VL row order:
- RAW (what our loader ships): uint8 RGB values before rescale/normalization; image rows hold ONE frame
  (3 * p * p values, e.g. 588; the processor's temporal copy is implied), video rows a frame pair (P values).
  The model turns them into the processor's values on the device (model.vision.normalize_pixel_rows). This
  keeps worker-to-trainer and host-to-device traffic at 1/8 (images) and 1/4 (videos) of float32 rows.
- NORMALIZED: float rows of width P exactly as transformers' processor returns them (parity tests, HF users).

A microbatch with no image has pixel_values with 0 rows and image_grid_thw of shape (0, 3) (same for video);
the model then runs a zero-weighted dummy ViT pass so every rank runs the same vision graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

IGNORE_INDEX = -100
"""The label of a position that is not supervised (torch's cross_entropy default ignore_index)."""
PATCH_DIM = 3 * 2 * 14 * 14
"""The row width at patch size 14 (Qwen2-VL, Qwen2.5-VL); also the width of empty (0-row) pixel tensors."""
IMAGE_ROW_DIM = 3 * 14 * 14  # a raw image row at patch size 14: one frame
HOST_FIELDS = ("image_grid_thw", "video_grid_thw")
"""Fields that stay on the host when a batch moves to a device (see PackedBatch.to)."""


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, PATCH_DIM))
    image_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    pixel_values_videos: torch.Tensor = field(default_factory=lambda: torch.zeros(0, PATCH_DIM))
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    sample_keys: list[str] = field(default_factory=list)
    supervised: int | None = field(default=None, repr=False, compare=False)
    """Cached count of supervised positions (num_supervised): counted once, on the host, and carried by to(), so
    a batch on the device never needs a device read to be counted."""
    supervised_idx: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """The supervised positions (S,) int64, found on the host before the labels move (the loss takes them instead
    of searching the labels on the device, a read back); None until set (parallel/engine.py prepares it)."""
    prepared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Extra model keyword arguments built on the host from this batch (model.vlm.VLModel.host_inputs: the ViT's
    plan, the placeholder counts); their tensors move with the batch, so the forward reads nothing back."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_supervised(self) -> int:
        if self.supervised is None:
            self.supervised = int((self.labels != IGNORE_INDEX).sum())
        return self.supervised

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0] + self.pixel_values_videos.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        T = self.input_ids.numel()
        if self.labels.shape != (T,):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} != ({T},)")
        if self.position_ids.shape != (3, T):
            raise ValueError(f"position_ids shape {tuple(self.position_ids.shape)} != (3, {T})")
        if int(self.cu_seqlens[0]) != 0 or int(self.cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must run from 0 to {T}, got {self.cu_seqlens.tolist()}")
        sides = set()
        for px, grid, name in (
            (self.pixel_values, self.image_grid_thw, "image"),
            (self.pixel_values_videos, self.video_grid_thw, "video"),
        ):
            rows = int(grid.prod(-1).sum()) if grid.numel() else 0
            if px.shape[0] != rows:
                raise ValueError(f"{name}: {px.shape[0]} pixel rows but grids give {rows}")
            if px.ndim != 2:
                raise ValueError(f"{name}: pixel rows of shape {tuple(px.shape)}; expected (rows, width)")
            if not rows:
                continue
            frames = (1, 2) if (px.dtype == torch.uint8 and name == "image") else (2,)
            side = next((s for f in frames if (s := _patch_side(px.shape[1], f))), None)
            if side is None:
                raise ValueError(f"{name}: {px.dtype} pixel rows of width {px.shape[1]}; a row holds "
                                 f"{' or '.join(map(str, frames))} frame(s) of 3 x p x p values (p: the patch size)")
            sides.add(side)
        if len(sides) > 1:
            raise ValueError(f"image and video pixel rows are of different patch sizes {sorted(sides)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The tensors on `device`, except the grids: image_grid_thw / video_grid_thw are host metadata (the ViT
        derives its segment boundaries and rotary positions from them on the host), so they stay where they are
        and reading them never waits for the device."""
        self.num_supervised  # noqa: B018 - counted here, on the host, before the labels move
        return self.map_device_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def map_device_tensors(self, fn) -> PackedBatch:
        """A copy with fn applied to every tensor that goes to the device (the grids stay): the fields and the
        tensors inside `prepared`."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "prepared":
                v = tree_map_only(torch.Tensor, fn, v)
            elif isinstance(v, torch.Tensor) and f.name not in HOST_FIELDS:
                v = fn(v)
            kw[f.name] = v
        return PackedBatch(**kw)

    def model_inputs(self) -> dict:
        """Keyword arguments for model.vlm.VLModel.forward (the labels go to the loss, not the model)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            **self.prepared,
        }

    def as_dict(self) -> dict:
        """Plain dict (for torch.save dumps and DataLoader collation)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _patch_side(width: int, frames: int) -> int | None:
    """The patch size p of rows `width` wide holding `frames` frames of 3 x p x p values, or None."""
    if width % (3 * frames):
        return None
    p = round((width // (3 * frames)) ** 0.5)
    return p if p * p * 3 * frames == width else None
