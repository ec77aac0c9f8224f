"""Qwen2-VL config.json <-> ModelConfig, and the decoder part every family shares.

Read: what transformers 4.x (flat decoder keys) and 5.x (decoder keys nested under `text_config`, rope settings
under `rope_parameters`) write. Written: flat 4.x-style keys, which 4.x and 5.x both read.
"""

from __future__ import annotations

from typing import Any

from model.config import (
    IM_END_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    ModelConfig,
    TextConfig,
    VisionConfig,
)

BOS_ID = 151643


def text_section(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's keys: 5.x nests them under text_config; flat keys, where present, are the same values."""
    return {**d, **d["text_config"]} if isinstance(d.get("text_config"), dict) else dict(d)


def read_text(d: dict[str, Any], *, interleaved_ok: bool = False) -> TextConfig:
    """The decoder of any family's config.json (Qwen2's keys, plus Qwen3's head_dim / QK-norm where present)."""
    text = text_section(d)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = text.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"config.json rope type {rope_type!r} is not supported; these models use plain M-RoPE")
    if text.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true; the released checkpoints use full attention "
                         "and this framework implements only that")
    interleaved = bool(rope.get("mrope_interleaved", False))
    if interleaved and not interleaved_ok:
        raise ValueError("config.json sets mrope_interleaved=true, a Qwen3-VL setting, on another family")
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim")
    return TextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim_override=head_dim if head_dim and head_dim != text["hidden_size"] // heads else None,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        mrope_interleaved=interleaved,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        hidden_act=text.get("hidden_act", "silu"),
    )


def text_to_hf(t: TextConfig) -> dict[str, Any]:
    """The decoder's config.json keys (4.x names; 5.x reads them too)."""
    rope: dict[str, Any] = {"type": "mrope", "mrope_section": list(t.mrope_section)}
    return {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
    }


def token_ids_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "bos_token_id": BOS_ID,
        "eos_token_id": IM_END_ID,
    }


def token_ids_from_hf(d: dict[str, Any]) -> dict[str, int]:
    return {
        "image_token_id": d.get("image_token_id", IMAGE_PAD_ID),
        "video_token_id": d.get("video_token_id", VIDEO_PAD_ID),
        "vision_start_token_id": d.get("vision_start_token_id", VISION_START_ID),
        "vision_end_token_id": d.get("vision_end_token_id", VISION_END_ID),
    }


def check_merger_width(vd: dict[str, Any], key: str, t: TextConfig) -> None:
    if vd.get(key, t.hidden_size) != t.hidden_size:
        raise ValueError(f"vision_config.{key}={vd.get(key)} (merger output) != hidden_size={t.hidden_size}")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **text_to_hf(t),
        **token_ids_to_hf(cfg),
        "vision_config": {
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": t.hidden_size,
            "hidden_act": v.hidden_act,
            "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "in_chans": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            # 5.x reads the ViT's rotary base from here (4.x hard-codes 10000, the only published value).
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        },
    }


def vision_rope_theta(vd: dict[str, Any]) -> float:
    return float(vd.get("rope_theta", (vd.get("rope_parameters") or {}).get("rope_theta", 10000.0)))


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """A Qwen2-VL config.json written by transformers 4.x (flat) or 5.x (text_config nested)."""
    vd = d.get("vision_config", {})
    tc = read_text(d)
    vision = VisionConfig(
        depth=vd.get("depth", 32),
        embed_dim=vd.get("embed_dim", 1280),
        num_heads=vd.get("num_heads", 16),
        mlp_ratio=vd.get("mlp_ratio", 4.0),
        hidden_act=vd.get("hidden_act", "quick_gelu"),
        in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
        patch_size=vd.get("patch_size", vd.get("spatial_patch_size", 14)),
        temporal_patch_size=vd.get("temporal_patch_size", 2),
        spatial_merge_size=vd.get("spatial_merge_size", 2),
        rope_theta=vision_rope_theta(vd),
    )
    check_merger_width(vd, "hidden_size", tc)
    return ModelConfig(family="qwen2_vl", vision=vision, text=tc, **token_ids_from_hf(d))
