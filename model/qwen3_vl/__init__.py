"""Qwen3-VL, dense (2025): a ViT of 16-pixel patches (LayerNorm, GELU-tanh MLP) with a learned position table
resampled to each image's grid, DeepStack (the outputs of listed ViT blocks go through mergers of their own and are
added to the LLM's hidden states at the visual positions after decoder layers 0, 1, ...), a Qwen3 decoder (QK-norm,
no qkv bias, head_dim 128) with interleaved M-RoPE, and videos whose time is written as text timestamps before each
frame pair. Facts from transformers 5.23 `models/qwen3_vl/modular_qwen3_vl.py` and its processors, and the
Qwen/Qwen3-VL-*-Instruct config.json files. The MoE variants (expert parallelism) are refused (model/family.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig, VisionConfig
from model.family import ModelFamily, ParallelPlan, decoder_layer_roles, vision_block_roles
from model.processing import HALF, VisionProcessing
from model.qwen3_vl.hf import config_from_hf, config_to_hf
from model.qwen3_vl.presets import PRESETS
from model.vision import TwoLayerMLP, VisionBlock, VisionPlan, VisionTower, layer_norm


class DeepStackMerger(nn.Module):
    """Qwen3-VL's merger: a LayerNorm over each patch (C) or, for the DeepStack mergers, over each 2x2 window's
    concatenated features (4C), then a 2-layer GELU MLP (4C -> 4C -> D)."""

    def __init__(self, cfg: VisionConfig, out_dim: int, postshuffle_norm: bool) -> None:
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.window_dim if postshuffle_norm else cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.window_dim, self.window_dim)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.window_dim, out_dim)

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        x_MW = self.norm(x_NC.view(-1, self.window_dim)) if self.postshuffle_norm else self.norm(x_NC).view(
            -1, self.window_dim)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x_MW)))


def interpolation_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (N, 4), weights (N, 4)) into the flattened side x side position table: bilinear resampling with
    aligned corners of the table to each image's (h, w) patch grid, in the rows' merge-window order, repeated for
    every frame pair. The arithmetic of transformers' get_vision_interpolation_indices_and_weights (fp32)."""
    def axis(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(taps (n, 2), weights (n, 2)) of n target positions on one axis of the table."""
        src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
        lo = torch.floor(src)
        taps = (lo.long()[:, None] + torch.arange(2)).clamp(0, side - 1)
        return taps, (1 - (src[:, None] - lo[:, None] - torch.arange(2)).abs()).clamp(min=0)

    def window_order(x_HW4: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(h, w) -> (h/m, m, w/m, m) -> (h/m, w/m, m, m): the processor's merge-window row order."""
        return x_HW4.view(h // merge, merge, w // merge, merge, 4).permute(0, 2, 1, 3, 4).reshape(-1, 4)

    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        (ht, hw), (wt, ww) = axis(h), axis(w)
        i_HW4 = (ht[:, None, :, None] * side + wt[None, :, None, :]).reshape(h, w, 4)
        w_HW4 = (hw[:, None, :, None] * ww[None, :, None, :]).reshape(h, w, 4)
        idx.append(window_order(i_HW4, h, w).repeat(t, 1))
        wts.append(window_order(w_HW4, h, w).repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


class DeepStackVisionTower(VisionTower):
    """Qwen3-VL's tower: a learned position table added after the patch embedding, DeepStack mergers."""

    def __init__(self, cfg: ModelConfig, block, merger: nn.Module) -> None:
        super().__init__(cfg, block, merger, patch_bias=True)
        v = cfg.vision
        self.pos_embed = nn.Embedding(v.num_position_embeddings, v.embed_dim)
        self.side = int(round(v.num_position_embeddings**0.5))
        self.deepstack_merger_list = nn.ModuleList(
            DeepStackMerger(v, cfg.text.hidden_size, postshuffle_norm=True) for _ in v.deepstack_visual_indexes)

    def plan_extra(self, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        idx_N4, w_N4 = interpolation_taps(grid_thw, self.side, self.cfg.spatial_merge_size)
        return {"pos_taps": idx_N4, "pos_weights": w_N4}

    def embed_patches(self, pixels_NP: torch.Tensor, plan: VisionPlan) -> torch.Tensor:
        x_NC = self.patch_embed(pixels_NP)
        taps, wts = plan.extra["pos_taps"], plan.extra["pos_weights"]
        pos_NC = (self.pos_embed(taps) * wts[:, :, None]).sum(1)
        return x_NC + pos_NC.to(x_NC.dtype)

    def deepstack(self, index: int, x_NC: torch.Tensor) -> torch.Tensor | None:
        levels = self.cfg.deepstack_visual_indexes
        return self.deepstack_merger_list[levels.index(index)](x_NC) if index in levels else None


def build_vision(cfg: ModelConfig) -> nn.Module:
    v: VisionConfig = cfg.vision

    def block(i: int) -> nn.Module:  # noqa: ARG001
        mlp = TwoLayerMLP(v.embed_dim, v.mlp_dim, v.hidden_act, names=("linear_fc1", "linear_fc2"))
        return VisionBlock(v, cfg.attn_backend, layer_norm, mlp)

    return DeepStackVisionTower(cfg, block, DeepStackMerger(v, cfg.text.hidden_size, postshuffle_norm=False))


def processing(cfg: ModelConfig) -> VisionProcessing:
    v = cfg.vision
    return VisionProcessing(
        family="qwen3_vl", patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size, pixel_mean=HALF, pixel_std=HALF, video_time="timestamps",
        tokens_per_second=0.0, default_system=None,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
    )


def plan(cfg: ModelConfig) -> ParallelPlan:
    gather = ("visual.merger", *(f"visual.deepstack_merger_list.{j}"
                                 for j in range(len(cfg.vision.deepstack_visual_indexes))))
    return ParallelPlan(vision_block=vision_block_roles({"linear_fc1": "colwise", "linear_fc2": "rowwise"}),
                        decoder_layer=decoder_layer_roles(cfg.text.qk_norm), vision_gather=gather)


def validate(cfg: ModelConfig) -> None:
    v, t = cfg.vision, cfg.text
    side = int(round(v.num_position_embeddings**0.5))
    if v.num_position_embeddings <= 0 or side * side != v.num_position_embeddings:
        raise ValueError(f"vision.num_position_embeddings={v.num_position_embeddings}: Qwen3-VL needs a square "
                         "table (the released models use 2304 = 48 x 48)")
    if bad := [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]:
        raise ValueError(f"vision.deepstack_visual_indexes={list(v.deepstack_visual_indexes)}: {bad} outside the "
                         f"{v.depth} ViT blocks")
    if len(v.deepstack_visual_indexes) > t.num_layers:
        raise ValueError(f"{len(v.deepstack_visual_indexes)} DeepStack levels need as many decoder layers, "
                         f"text.num_layers={t.num_layers}")
    if v.window_size or v.fullatt_block_indexes or v.tokens_per_second:
        raise ValueError("vision.window_size / fullatt_block_indexes / tokens_per_second are Qwen2.5-VL settings")
    if not (t.qk_norm and t.mrope_interleaved) or t.qkv_bias:
        raise ValueError("a Qwen3-VL decoder has text.qk_norm=true, text.mrope_interleaved=true, text.qkv_bias=false")


FAMILY = ModelFamily(
    name="qwen3_vl", title="Qwen3-VL", hf_model_types=("qwen3_vl",),
    hf_architecture="Qwen3VLForConditionalGeneration", presets=PRESETS, config_to_hf=config_to_hf,
    config_from_hf=config_from_hf, build_vision=build_vision, processing=processing, plan=plan, validate=validate,
    hf_write_layout="transformers5",
    # The DeepStack mergers project ViT features into the LLM as the patch merger does: the merger group (trained
    # in stage 3 with the ViT frozen, lr_merger), as Qwen3-VL's own fine-tuning code groups them with the merger.
    group_prefixes=(("visual.merger.", "merger"), ("visual.deepstack_merger_list.", "merger"), ("visual.", "vision")),
)
