"""Fixtures for the model tests: tiny configs and tiny random checkpoints written by transformers itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig, TextConfig, VisionConfig


def small_cfg(tie: bool = False, vocab_size: int = 151936) -> ModelConfig:
    """Tiny but complete: the real vocabulary size (so the real image/video pad ids are valid), 2 ViT blocks,
    3 decoder layers, GQA 4/2, M-RoPE sections (2, 3, 3)."""
    return ModelConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
            mrope_section=(2, 3, 3), tie_word_embeddings=tie,
        ),
    )


def small_vocab_cfg(vocab_size: int = 2048) -> ModelConfig:
    """small_cfg with a 2k vocabulary and the vision special tokens moved to its top ids, for tests that
    involve neither the tokenizer nor transformers (the model reads these ids from the config)."""
    return dataclasses.replace(
        small_cfg(vocab_size=vocab_size), image_token_id=vocab_size - 4, video_token_id=vocab_size - 3,
        vision_start_token_id=vocab_size - 2, vision_end_token_id=vocab_size - 1,
    )


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory) -> str:
    """A random Qwen2-VL checkpoint saved by transformers' save_pretrained (hub layout), untied head."""
    from model.parity import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("hf_tiny"), small_cfg(), seed=1))


@pytest.fixture(scope="session")
def hf_tiny(hf_tiny_dir):
    """transformers' model loaded from hf_tiny_dir (fp32, eager attention: the plainest reference)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration.from_pretrained(hf_tiny_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
