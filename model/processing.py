"""Processor facts of a model family: how images and videos become patch rows, tokens and M-RoPE position ids.

A family's `processing(cfg)` (model/family.py) returns a VisionProcessing: the loader (data/), generation
(model/generate.py) and the parity suite all read it, so the three agree on what a sample becomes. The values are
those of each family's transformers processor and its reference tooling (qwen-vl-utils):

| | Qwen2-VL | Qwen2.5-VL | Qwen3-VL |
|---|---|---|---|
| patch / merge / resize factor | 14 / 2 / 28 | 14 / 2 / 28 | 16 / 2 / 32 |
| pixel mean / std | OpenAI CLIP | OpenAI CLIP | 0.5 / 0.5 |
| video time in M-RoPE | frame-pair index | seconds x tokens_per_second | text timestamps, one block per frame pair |
| default system prompt | "You are a helpful assistant." | same | none |

Image pixel bounds follow qwen-vl-utils: 4 to 16384 merged tokens of factor x factor pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from model.position_ids import mrope_position_ids, packed_mrope_position_ids

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

VideoTime = Literal["index", "seconds", "timestamps"]


@dataclass(frozen=True)
class VisionProcessing:
    """What a family's processor does to images and videos, and the position ids of the tokens it makes."""

    family: str
    """The family these facts belong to (for messages and checkpoints)."""
    patch_size: int
    """Spatial patch size in pixels."""
    temporal_patch_size: int
    """Frames per temporal patch (an image is repeated to fill one)."""
    merge_size: int
    """Patches per side merged into one LLM token."""
    pixel_mean: tuple[float, float, float]
    """Per-channel mean of the normalization (after scaling to [0, 1])."""
    pixel_std: tuple[float, float, float]
    """Per-channel std of the normalization."""
    video_time: VideoTime
    """How a video's time reaches the model: 'index' (the temporal M-RoPE id is the frame pair's index),
    'seconds' (floor(index x seconds per pair x tokens_per_second)), 'timestamps' (text '<t seconds>' before each
    frame pair, which is its own vision block)."""
    tokens_per_second: float
    """'seconds' only: temporal ids per second of video."""
    default_system: str | None
    """System prompt the chat template inserts when a chat has none (None: nothing)."""
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    image_min_tokens: int = 4
    """qwen-vl-utils' default smallest image, in merged tokens."""
    image_max_tokens: int = 16384
    """qwen-vl-utils' default largest image, in merged tokens."""

    @property
    def factor(self) -> int:
        """Resized image sides are multiples of this (patch_size x merge_size)."""
        return self.patch_size * self.merge_size

    @property
    def min_pixels(self) -> int:
        return self.image_min_tokens * self.factor * self.factor

    @property
    def max_pixels(self) -> int:
        return self.image_max_tokens * self.factor * self.factor

    @property
    def patch_dim(self) -> int:
        """Length of one processor-normalized pixel row (3 channels x temporal patch x patch x patch)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    # ---------------------------------------------------------------- position ids
    def video_blocks(self, video_grid_thw: torch.Tensor | None) -> torch.Tensor | None:
        """The grids of the video placeholder blocks in token order: one per video, or with text timestamps one per
        frame pair (t = 1 each), which is how the processor lays the tokens out."""
        if video_grid_thw is None or self.video_time != "timestamps":
            return video_grid_thw
        g = video_grid_thw.reshape(-1, 3)
        out = torch.repeat_interleave(g, g[:, 0], dim=0)
        out[:, 0] = 1
        return out

    def time_scales(self, seconds_per_pair: Sequence[float] | None, n_videos: int) -> list[float] | None:
        """Per video temporal scale for 'seconds' (tokens_per_second x seconds per frame pair), else None."""
        if self.video_time != "seconds" or n_videos == 0:
            return None
        if seconds_per_pair is None or len(seconds_per_pair) != n_videos:
            raise ValueError(f"{self.family} videos need their seconds per frame pair (one per video, "
                             f"{n_videos} videos), got {seconds_per_pair!r}")
        return [float(self.tokens_per_second) * float(s) for s in seconds_per_pair]

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None,
                     video_seconds_per_pair: Sequence[float] | None = None) -> torch.Tensor:
        """(3, L) M-RoPE ids of ONE sample's tokens (see model/position_ids.py)."""
        n_vid = 0 if video_grid_thw is None else video_grid_thw.reshape(-1, 3).shape[0]
        return mrope_position_ids(
            input_ids, image_grid_thw, self.video_blocks(video_grid_thw), spatial_merge_size=self.merge_size,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            video_time_scale=self.time_scales(video_seconds_per_pair, n_vid),
        )

    def packed_position_ids(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                            image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                            video_seconds_per_pair: Sequence[float] | None = None) -> torch.Tensor:
        """(3, T) ids of a packed sequence: every sample restarts at 0."""
        n_vid = 0 if video_grid_thw is None else video_grid_thw.reshape(-1, 3).shape[0]
        scales = self.time_scales(video_seconds_per_pair, n_vid)
        blocks = self.video_blocks(video_grid_thw)
        if scales is not None and blocks is not None and blocks.shape[0] != n_vid:  # pragma: no cover
            raise AssertionError("time scales and split video blocks do not go together")
        return packed_mrope_position_ids(
            input_ids, cu_seqlens, image_grid_thw, blocks, spatial_merge_size=self.merge_size,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id, video_time_scale=scales,
        )

    def frame_pair_timestamps(self, frame_indices: Sequence[int], video_fps: float) -> list[float]:
        """Qwen3-VL: the time of each frame pair in seconds, the mean of its first and last frame's times (the
        index list is padded with its last entry to a whole number of pairs), as its processor computes them."""
        idx = list(frame_indices)
        tp = self.temporal_patch_size
        if len(idx) % tp:
            idx += [idx[-1]] * (tp - len(idx) % tp)
        times = [i / video_fps for i in idx]
        return [(times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp)]
