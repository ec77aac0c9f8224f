"""Qwen3-VL (dense) presets: the published config.json values of Qwen/Qwen3-VL-{2B,4B,8B,32B}-Instruct, and a tiny one.

Two ViTs (2B/4B: 24 blocks of width 1024, DeepStack after blocks 5, 11, 17; 8B/32B: 27 blocks of width 1152, DeepStack
after 8, 16, 24), 16-pixel patches, a 48 x 48 position table, and a Qwen3 decoder (head_dim 128, QK-norm) with
interleaved M-RoPE sections (24, 20, 20) and rope base 5e6.
"""

from __future__ import annotations

from model.config import ModelConfig, TextConfig, VisionConfig


def _vit(depth: int, width: int, inter: int, deepstack: tuple[int, ...]) -> VisionConfig:
    return VisionConfig(depth=depth, embed_dim=width, num_heads=16, intermediate_size=inter,
                        hidden_act="gelu_pytorch_tanh", patch_size=16, num_position_embeddings=2304,
                        deepstack_visual_indexes=deepstack)


def _text(hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool) -> TextConfig:
    return TextConfig(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, head_dim_override=128, rope_theta=5_000_000.0, mrope_section=(24, 20, 20),
                      mrope_interleaved=True, qkv_bias=False, qk_norm=True, tie_word_embeddings=tie,
                      max_position_embeddings=262144)


def tiny() -> ModelConfig:
    """A tiny random model for CPU tests and the demo (real vocabulary, untied head, head_dim 16 != 64/4 ... kept
    explicit so the head_dim path is exercised): 3 ViT blocks with DeepStack after blocks 0 and 1, a 4 x 4 table."""
    return ModelConfig(
        family="qwen3_vl",
        vision=VisionConfig(depth=3, embed_dim=32, num_heads=4, intermediate_size=48, hidden_act="gelu_pytorch_tanh",
                            patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=(0, 1)),
        text=TextConfig(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
            head_dim_override=24, mrope_section=(4, 4, 4), mrope_interleaved=True, qkv_bias=False, qk_norm=True,
            rope_theta=5_000_000.0, tie_word_embeddings=False,
        ),
    )


def qwen3vl_2b() -> ModelConfig:
    """Qwen3-VL-2B: Qwen3-1.7B-class decoder (tied embeddings) + the small ViT."""
    return ModelConfig(family="qwen3_vl", vision=_vit(24, 1024, 4096, (5, 11, 17)),
                       text=_text(2048, 6144, 28, 16, 8, True))


def qwen3vl_4b() -> ModelConfig:
    """Qwen3-VL-4B: Qwen3-4B decoder (tied embeddings) + the small ViT."""
    return ModelConfig(family="qwen3_vl", vision=_vit(24, 1024, 4096, (5, 11, 17)),
                       text=_text(2560, 9728, 36, 32, 8, True))


def qwen3vl_8b() -> ModelConfig:
    """Qwen3-VL-8B: Qwen3-8B decoder + the large ViT."""
    return ModelConfig(family="qwen3_vl", vision=_vit(27, 1152, 4304, (8, 16, 24)),
                       text=_text(4096, 12288, 36, 32, 8, False))


def qwen3vl_32b() -> ModelConfig:
    """Qwen3-VL-32B: Qwen3-32B decoder + the large ViT."""
    return ModelConfig(family="qwen3_vl", vision=_vit(27, 1152, 4304, (8, 16, 24)),
                       text=_text(5120, 25600, 64, 64, 8, False))


PRESETS = {"tiny": tiny, "2b": qwen3vl_2b, "4b": qwen3vl_4b, "8b": qwen3vl_8b, "32b": qwen3vl_32b}
