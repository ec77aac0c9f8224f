"""Qwen2-VL presets: the published config.json values of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct, and a tiny one.

One 675M-parameter ViT (32 blocks, width 1280, 16 heads) shared by all three sizes, a 2x2 patch merger projecting
into the LLM width, and a Qwen2 decoder with M-RoPE sections (16, 24, 24).
"""

from __future__ import annotations

from model.config import ModelConfig, TextConfig, VisionConfig


def _vit() -> VisionConfig:
    # The 675M ViT shared by 2B, 7B and 72B (DFN-derived, 32 blocks x 1280 wide).
    return VisionConfig()


def tiny() -> ModelConfig:
    """A tiny random model for CPU tests and the demo. Keeps the real vocabulary size so the real
    Qwen2 tokenizer's ids (vision pads at 151655/151656) are valid, and untied embeddings so both
    head layouts stay exercised (2B ties them, 7B/72B do not)."""
    return ModelConfig(
        family="qwen2_vl",
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        text=TextConfig(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
            mrope_section=(2, 3, 3), tie_word_embeddings=False,
        ),
    )


def qwen2vl_2b() -> ModelConfig:
    """Qwen2-VL-2B: 1.5B Qwen2 decoder (tied embeddings) + 675M ViT."""
    return ModelConfig(family="qwen2_vl", vision=_vit(), text=TextConfig(
        hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
        tie_word_embeddings=True))


def qwen2vl_7b() -> ModelConfig:
    """Qwen2-VL-7B: 7.6B Qwen2 decoder + 675M ViT."""
    return ModelConfig(family="qwen2_vl", vision=_vit(), text=TextConfig(
        hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        tie_word_embeddings=False))


def qwen2vl_72b() -> ModelConfig:
    """Qwen2-VL-72B: 72B Qwen2 decoder + 675M ViT."""
    return ModelConfig(family="qwen2_vl", vision=_vit(), text=TextConfig(
        hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64, num_kv_heads=8,
        tie_word_embeddings=False))


PRESETS = {"tiny": tiny, "2b": qwen2vl_2b, "7b": qwen2vl_7b, "72b": qwen2vl_72b}
