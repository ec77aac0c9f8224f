"""Qwen2-VL (2024): the 675M-parameter ViT (LayerNorm, QuickGELU MLP, attention within each frame pair) with its
2x2 LayerNorm merger, and a Qwen2 decoder with chunked M-RoPE. Facts from transformers 5.23
`models/qwen2_vl/` and the Qwen/Qwen2-VL-*-Instruct config.json files.

The shared pieces (model/vision.py, model/text.py, model/vlm.py) are Qwen2-VL's; this folder declares the family:
its vision tower, presets, config.json mapping and processor facts. Qwen2.5-VL and Qwen3-VL build on it.
"""

from __future__ import annotations

import torch.nn as nn

from model.config import ModelConfig, VisionConfig
from model.family import ModelFamily, ParallelPlan, decoder_layer_roles, vision_block_roles
from model.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionProcessing
from model.qwen2_vl.hf import config_from_hf, config_to_hf
from model.qwen2_vl.presets import PRESETS
from model.vision import PatchMerger, TwoLayerMLP, VisionBlock, VisionTower, layer_norm

DEFAULT_SYSTEM = "You are a helpful assistant."
"""The system prompt Qwen2-VL's (and Qwen2.5-VL's) chat template inserts when a chat has none."""


def build_vision(cfg: ModelConfig) -> nn.Module:
    v: VisionConfig = cfg.vision

    def block(i: int) -> nn.Module:  # noqa: ARG001
        return VisionBlock(v, cfg.attn_backend, layer_norm, TwoLayerMLP(v.embed_dim, v.mlp_dim, v.hidden_act))

    return VisionTower(cfg, block, PatchMerger(v, cfg.text.hidden_size, layer_norm))


def processing(cfg: ModelConfig) -> VisionProcessing:
    v = cfg.vision
    return VisionProcessing(
        family="qwen2_vl", patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size, pixel_mean=OPENAI_CLIP_MEAN, pixel_std=OPENAI_CLIP_STD,
        video_time="index", tokens_per_second=0.0, default_system=DEFAULT_SYSTEM,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
    )


def plan(cfg: ModelConfig) -> ParallelPlan:
    return ParallelPlan(vision_block=vision_block_roles({"fc1": "colwise", "fc2": "rowwise"}),
                        decoder_layer=decoder_layer_roles(cfg.text.qk_norm))


def validate(cfg: ModelConfig) -> None:
    v = cfg.vision
    if v.hidden_act != "quick_gelu":
        raise ValueError(f"vision.hidden_act={v.hidden_act!r}; Qwen2-VL's ViT uses 'quick_gelu'")
    extras = {"window_size": v.window_size, "fullatt_block_indexes": v.fullatt_block_indexes,
              "tokens_per_second": v.tokens_per_second, "num_position_embeddings": v.num_position_embeddings,
              "deepstack_visual_indexes": v.deepstack_visual_indexes}
    if used := [k for k, val in extras.items() if val]:
        raise ValueError(f"vision.{used[0]} is not a Qwen2-VL setting (Qwen2.5-VL / Qwen3-VL only); set model.family")
    if cfg.text.qk_norm or cfg.text.mrope_interleaved:
        raise ValueError("text.qk_norm / text.mrope_interleaved are Qwen3-VL settings; set model.family: qwen3_vl")


FAMILY = ModelFamily(
    name="qwen2_vl", title="Qwen2-VL", hf_model_types=("qwen2_vl",),
    hf_architecture="Qwen2VLForConditionalGeneration", presets=PRESETS, config_to_hf=config_to_hf,
    config_from_hf=config_from_hf, build_vision=build_vision, processing=processing, plan=plan, validate=validate,
)
