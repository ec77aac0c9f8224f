"""Qwen3-VL config.json <-> ModelConfig: decoder keys nested under `text_config` (with `head_dim` and interleaved
M-RoPE), vision keys naming the ViT width `hidden_size`, the merger's output `out_hidden_size`, the position table
`num_position_embeddings` and the DeepStack blocks `deepstack_visual_indexes`. Written in the form of the released
checkpoints' config.json (rope settings in `rope_scaling` + `rope_theta`), which transformers 4.57 and 5.x read."""

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
    text = text_to_hf(t)
    text.pop("use_sliding_window")
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True}
    text |= {"head_dim": t.head_dim, "attention_bias": False, "model_type": "qwen3_vl_text"}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        **token_ids_to_hf(cfg),
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": text,
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.embed_dim,
            "intermediate_size": v.mlp_dim,
            "hidden_act": v.hidden_act,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "out_hidden_size": t.hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        },
    }


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    vd = d.get("vision_config", {})
    tc = read_text(d, interleaved_ok=True)
    tc.qk_norm, tc.qkv_bias = True, bool((d.get("text_config") or d).get("attention_bias", False))
    if not tc.mrope_interleaved:
        raise ValueError("config.json: a Qwen3-VL decoder uses interleaved M-RoPE (rope_scaling.mrope_interleaved)")
    vision = VisionConfig(
        depth=vd.get("depth", 27),
        embed_dim=vd.get("hidden_size", 1152),
        num_heads=vd.get("num_heads", 16),
        intermediate_size=vd.get("intermediate_size", 4304),
        hidden_act=vd.get("hidden_act", "gelu_pytorch_tanh"),
        in_channels=vd.get("in_channels", 3),
        patch_size=vd.get("patch_size", 16),
        temporal_patch_size=vd.get("temporal_patch_size", 2),
        spatial_merge_size=vd.get("spatial_merge_size", 2),
        rope_theta=vision_rope_theta(vd),
        num_position_embeddings=vd.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(vd.get("deepstack_visual_indexes", (8, 16, 24))),
    )
    check_merger_width(vd, "out_hidden_size", tc)
    return ModelConfig(family="qwen3_vl", vision=vision, text=tc, **token_ids_from_hf(d))
