"""Qwen2.5-VL (2025): Qwen2-VL's layout with a ViT of RMSNorms and SwiGLU MLPs (with biases) that attends within
112-pixel windows except in `fullatt_block_indexes`, an RMSNorm merger, and video M-RoPE in absolute time. Facts
from transformers 5.23 `models/qwen2_5_vl/modular_qwen2_5_vl.py` and the Qwen/Qwen2.5-VL-*-Instruct config.json
files. The decoder is Qwen2-VL's (model/text.py).

Window attention: the ViT's rows are permuted window by window (whole 2x2 merge groups, in the order of
`window_index`) before the first block, window blocks attend within each window, full blocks within each frame
pair (the permutation keeps every frame pair's rows together), and the merged tokens are put back in processor
order after the merger. Under sequence parallelism attention sees the whole (gathered) sequence, so windows never
mix across ranks, and a padding image SP appends is its own window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig, VisionConfig
from model.family import ModelFamily, ParallelPlan, decoder_layer_roles, vision_block_roles
from model.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionProcessing
from model.qwen2_5_vl.hf import config_from_hf, config_to_hf
from model.qwen2_5_vl.presets import PRESETS
from model.qwen2_vl import DEFAULT_SYSTEM
from model.text import RMSNorm
from model.vision import GatedMLP, PatchMerger, VisionBlock, VisionTower, vision_cu_seqlens


def window_index(grid_thw: torch.Tensor, merge: int, window_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (M,), cu_window_seqlens in patch rows): the merged tokens of every frame pair of every image/video, taken
    window by window (window_tokens x window_tokens merged tokens; edge windows are smaller), and the row
    boundaries of the windows. Same order and boundaries as transformers' get_vision_window_index."""
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        idx = torch.arange(t * lh * lw).view(t, lh, lw)
        ph, pw = -lh % window_tokens, -lw % window_tokens
        nh, nw = (lh + ph) // window_tokens, (lw + pw) // window_tokens
        padded = F.pad(idx, (0, pw, 0, ph), value=-1)
        win = padded.view(t, nh, window_tokens, nw, window_tokens).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        sizes = (win >= 0).sum(1)
        flat = win.flatten()
        order.append(flat[flat >= 0] + offset)
        for s in sizes[sizes > 0].tolist():
            bounds.append(bounds[-1] + s * merge * merge)
        offset += t * lh * lw
    return torch.cat(order), torch.tensor(bounds, dtype=torch.int32)


class WindowedVisionTower(VisionTower):
    """Qwen2.5-VL's tower: window attention except in the full-attention blocks."""

    def segments(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, int]]]:
        v = self.cfg
        window_tokens = v.window_size // v.spatial_merge_size // v.patch_size
        order, cu_win = window_index(grid_thw, v.spatial_merge_size, window_tokens)
        full = (vision_cu_seqlens(grid_thw), int((grid_thw[:, 1] * grid_thw[:, 2]).max()))
        win = (cu_win, int((cu_win[1:] - cu_win[:-1]).max()))
        return order, [full if i in v.fullatt_block_indexes else win for i in range(len(self.blocks))]


def rms_norm(dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps)


def build_vision(cfg: ModelConfig) -> nn.Module:
    v: VisionConfig = cfg.vision

    def block(i: int) -> nn.Module:  # noqa: ARG001
        return VisionBlock(v, cfg.attn_backend, rms_norm, GatedMLP(v.embed_dim, v.mlp_dim, v.hidden_act, bias=True))

    return WindowedVisionTower(cfg, block, PatchMerger(v, cfg.text.hidden_size, rms_norm))


def processing(cfg: ModelConfig) -> VisionProcessing:
    v = cfg.vision
    return VisionProcessing(
        family="qwen2_5_vl", patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size, pixel_mean=OPENAI_CLIP_MEAN, pixel_std=OPENAI_CLIP_STD,
        video_time="seconds", tokens_per_second=v.tokens_per_second, default_system=DEFAULT_SYSTEM,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
    )


def plan(cfg: ModelConfig) -> ParallelPlan:
    mlp = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    return ParallelPlan(vision_block=vision_block_roles(mlp), decoder_layer=decoder_layer_roles(cfg.text.qk_norm))


def validate(cfg: ModelConfig) -> None:
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if v.window_size <= 0 or v.window_size % unit:
        raise ValueError(f"vision.window_size={v.window_size}: Qwen2.5-VL needs a positive multiple of "
                         f"patch_size x spatial_merge_size = {unit} pixels (the released models use 112)")
    if bad := [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]:
        raise ValueError(f"vision.fullatt_block_indexes={list(v.fullatt_block_indexes)}: {bad} outside the "
                         f"{v.depth} blocks")
    if v.tokens_per_second <= 0:
        raise ValueError(f"vision.tokens_per_second={v.tokens_per_second}: must be > 0 (the released models use 2)")
    if v.num_position_embeddings or v.deepstack_visual_indexes:
        raise ValueError("vision.num_position_embeddings / deepstack_visual_indexes are Qwen3-VL settings")
    if cfg.text.qk_norm or cfg.text.mrope_interleaved:
        raise ValueError("text.qk_norm / text.mrope_interleaved are Qwen3-VL settings; set model.family: qwen3_vl")


FAMILY = ModelFamily(
    name="qwen2_5_vl", title="Qwen2.5-VL", hf_model_types=("qwen2_5_vl",),
    hf_architecture="Qwen2_5_VLForConditionalGeneration", presets=PRESETS, config_to_hf=config_to_hf,
    config_from_hf=config_from_hf, build_vision=build_vision, processing=processing, plan=plan, validate=validate,
)
