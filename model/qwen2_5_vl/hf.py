"""Qwen2.5-VL config.json <-> ModelConfig. The decoder keys are Qwen2-VL's (model/qwen2_vl/hf.py); the vision keys
name the ViT width `hidden_size` and the merger's output `out_hidden_size`."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, VisionConfig
from model.qwen2_vl.hf import (
    check_merger_width,
    read_text,
    text_to_hf,
    token_ids_from_hf,
    token_ids_to_hf,
    vision_rope_theta,
)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text_to_hf(t),
        **token_ids_to_hf(cfg),
        "vision_config": {
            "depth": v.depth,
            "hidden_size": v.embed_dim,
            "intermediate_size": v.mlp_dim,
            "hidden_act": v.hidden_act,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "in_chans": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
            else v.tokens_per_second,
            "out_hidden_size": t.hidden_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    vd = d.get("vision_config", {})
    tc = read_text(d)
    vision = VisionConfig(
        depth=vd.get("depth", 32),
        embed_dim=vd.get("hidden_size", 1280),
        num_heads=vd.get("num_heads", 16),
        intermediate_size=vd.get("intermediate_size", 3420),
        hidden_act=vd.get("hidden_act", "silu"),
        in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
        patch_size=vd.get("patch_size", vd.get("spatial_patch_size", 14)),
        temporal_patch_size=vd.get("temporal_patch_size", 2),
        spatial_merge_size=vd.get("spatial_merge_size", 2),
        rope_theta=vision_rope_theta(vd),
        window_size=vd.get("window_size", 112),
        fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=float(vd.get("tokens_per_second", 4)),
    )
    check_merger_width(vd, "out_hidden_size", tc)
    return ModelConfig(family="qwen2_5_vl", vision=vision, text=tc, **token_ids_from_hf(d))
