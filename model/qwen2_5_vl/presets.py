"""Qwen2.5-VL presets: the published config.json values of Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct, and a tiny one.

One ViT for all sizes (32 blocks, width 1280, 16 heads, SwiGLU 3420, windows of 112 pixels with full attention in
blocks 7, 15, 23, 31, 2 temporal ids per second), a merger into the LLM width, and a Qwen2 decoder with M-RoPE
sections (16, 24, 24).
"""

from __future__ import annotations

from model.config import ModelConfig, TextConfig, VisionConfig


def _vit() -> VisionConfig:
    return VisionConfig(depth=32, embed_dim=1280, num_heads=16, intermediate_size=3420, hidden_act="silu",
                        window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2.0)


def tiny() -> ModelConfig:
    """A tiny random model for CPU tests and the demo (real vocabulary, untied head); window 56 pixels = 2x2 merged
    tokens, so small test images already hold several windows, and block 1 of 2 attends over whole frames."""
    return ModelConfig(
        family="qwen2_5_vl",
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, intermediate_size=48, hidden_act="silu",
                            window_size=56, fullatt_block_indexes=(1,), tokens_per_second=2.0),
        text=TextConfig(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
            mrope_section=(2, 3, 3), tie_word_embeddings=False,
        ),
    )


def _text(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> TextConfig:
    return TextConfig(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, tie_word_embeddings=tie, max_position_embeddings=128000)


def qwen25vl_3b() -> ModelConfig:
    """Qwen2.5-VL-3B: Qwen2.5-3B decoder (tied embeddings) + ViT."""
    return ModelConfig(family="qwen2_5_vl", vision=_vit(), text=_text(2048, 11008, 36, 16, 2, True))


def qwen25vl_7b() -> ModelConfig:
    """Qwen2.5-VL-7B: Qwen2.5-7B decoder + ViT."""
    return ModelConfig(family="qwen2_5_vl", vision=_vit(), text=_text(3584, 18944, 28, 28, 4, False))


def qwen25vl_32b() -> ModelConfig:
    """Qwen2.5-VL-32B: Qwen2.5-32B decoder + ViT."""
    return ModelConfig(family="qwen2_5_vl", vision=_vit(), text=_text(5120, 27648, 64, 40, 8, False))


def qwen25vl_72b() -> ModelConfig:
    """Qwen2.5-VL-72B: Qwen2.5-72B decoder + ViT."""
    return ModelConfig(family="qwen2_5_vl", vision=_vit(), text=_text(8192, 29568, 80, 64, 8, False))


PRESETS = {"tiny": tiny, "3b": qwen25vl_3b, "7b": qwen25vl_7b, "32b": qwen25vl_32b, "72b": qwen25vl_72b}
