"""Fixtures for the model tests: tiny configs of every family and tiny random checkpoints written by transformers
itself. `family` parametrizes a test over Qwen2-VL, Qwen2.5-VL and Qwen3-VL; the checkpoint fixtures follow it,
so a test that takes `hf_tiny` runs once per family (session-scoped: one checkpoint per family for the session).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig, TextConfig, VisionConfig
from model.family import FAMILY_NAMES

ODD_TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                mrope_section=(2, 3, 3))


def small_cfg(family: str = "qwen2_vl", tie: bool = False, vocab_size: int = 151936) -> ModelConfig:
    """Tiny but complete, of each family: the real vocabulary size (so the real image/video pad ids are valid),
    2-3 ViT blocks, 3 decoder layers, GQA 4/2, odd widths. Qwen2.5-VL: 56-pixel windows (2 x 2 merged tokens: the
    test images hold several) with block 1 of 2 attending over whole frames. Qwen3-VL: a 4 x 4 position table,
    DeepStack after ViT blocks 0 and 2, head_dim 24 (not hidden / heads), interleaved M-RoPE (4, 4, 4)."""
    text = TextConfig(**{**ODD_TEXT, "vocab_size": vocab_size}, tie_word_embeddings=tie)
    if family == "qwen2_vl":
        vision = VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
    elif family == "qwen2_5_vl":
        vision = VisionConfig(depth=2, embed_dim=32, num_heads=4, intermediate_size=44, hidden_act="silu",
                              window_size=56, fullatt_block_indexes=(1,), tokens_per_second=2.0)
    elif family == "qwen3_vl":
        vision = VisionConfig(depth=3, embed_dim=32, num_heads=4, intermediate_size=44,
                              hidden_act="gelu_pytorch_tanh", patch_size=16, num_position_embeddings=16,
                              deepstack_visual_indexes=(0, 2))
        text = dataclasses.replace(text, head_dim_override=24, mrope_section=(4, 4, 4), mrope_interleaved=True,
                                   qkv_bias=False, qk_norm=True, rope_theta=5_000_000.0)
    else:
        raise ValueError(family)
    return ModelConfig(family=family, vision=vision, text=text)


def small_vocab_cfg(vocab_size: int = 2048, family: str = "qwen2_vl") -> ModelConfig:
    """small_cfg with a 2k vocabulary and the vision special tokens moved to its top ids, for tests that
    involve neither the tokenizer nor transformers (the model reads these ids from the config)."""
    return dataclasses.replace(
        small_cfg(family, vocab_size=vocab_size), image_token_id=vocab_size - 4, video_token_id=vocab_size - 3,
        vision_start_token_id=vocab_size - 2, vision_end_token_id=vocab_size - 1,
    )


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request) -> str:
    """Each model family in turn."""
    return request.param


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory, family) -> str:
    """A random checkpoint of `family` saved by transformers' save_pretrained, untied head."""
    from model.parity import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp(f"hf_tiny_{family}"), small_cfg(family), seed=1))


@pytest.fixture(scope="session")
def hf_tiny(hf_tiny_dir):
    """transformers' model loaded from hf_tiny_dir (fp32, eager attention: the plainest reference)."""
    from model.hf_adapter import read_hf_config
    from model.parity import hf_class

    torch.manual_seed(0)
    return hf_class(read_hf_config(hf_tiny_dir).family).from_pretrained(
        hf_tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
