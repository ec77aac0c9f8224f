"""The architecture of a Qwen-VL model as typed dataclasses, shared by every model family.

A ModelConfig is a ViT (+ its patch merger) and a decoder. The fields every family has are plain fields; the few
that only some families use default to "not used" (0, an empty tuple, False) and say which family sets them. The
family itself (`family`) says how the fields are read: its declaration (model/family.py, one folder per family
under model/) builds the modules, maps config.json both ways and carries the presets. Presets live with their
family (e.g. model/qwen2_vl/presets.py); `model.family.get_preset(family, name)` finds one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Special token ids of the Qwen2 tokenizer (shared by the Qwen2-VL, Qwen2.5-VL and Qwen3-VL tokenizers; checked
# against the real tokenizer files in the tests).
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656


@dataclass
class VisionConfig:
    """The ViT (naive dynamic resolution, 2D-RoPE) and its patch merger."""

    depth: int = 32
    """Number of ViT blocks."""
    embed_dim: int = 1280
    """ViT width (config.json: Qwen2-VL `embed_dim`, Qwen2.5-VL and Qwen3-VL `hidden_size`)."""
    num_heads: int = 16
    """ViT attention heads (head_dim = embed_dim / num_heads)."""
    mlp_ratio: float = 4.0
    """ViT MLP hidden width = embed_dim * mlp_ratio, unless intermediate_size is set."""
    intermediate_size: int | None = None
    """ViT MLP hidden width when given directly (Qwen2.5-VL 3420, Qwen3-VL 4304); null = embed_dim * mlp_ratio."""
    hidden_act: str = "quick_gelu"
    """ViT MLP activation: Qwen2-VL 'quick_gelu', Qwen2.5-VL 'silu' (SwiGLU), Qwen3-VL 'gelu_pytorch_tanh'."""
    in_channels: int = 3
    """Image channels (RGB)."""
    patch_size: int = 14
    """Spatial patch size of the Conv3d patch embedding (Qwen3-VL: 16)."""
    temporal_patch_size: int = 2
    """Temporal patch size: an image is two identical frames, a video is split in frame pairs."""
    spatial_merge_size: int = 2
    """The merger compresses each spatial_merge_size x spatial_merge_size window into one LLM token."""
    rope_theta: float = 10000.0
    """Base of the ViT's 2D rotary embedding."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the ViT norms (and the merger's)."""
    window_size: int = 0
    """Qwen2.5-VL: side in pixels of the attention windows (112); 0 = every block attends within whole frame pairs."""
    fullatt_block_indexes: tuple[int, ...] = ()
    """Qwen2.5-VL: blocks that attend within whole frame pairs instead of windows ((7, 15, 23, 31))."""
    tokens_per_second: float = 0.0
    """Qwen2.5-VL: temporal M-RoPE ids per second of video (2): a frame pair's temporal id is its start time in
    seconds times this; 0 = the temporal id is the frame pair's index (Qwen2-VL)."""
    num_position_embeddings: int = 0
    """Qwen3-VL: entries of the learned square position-embedding table (2304 = 48 x 48), bilinearly resampled to
    each image's patch grid and added after the patch embedding; 0 = none."""
    deepstack_visual_indexes: tuple[int, ...] = ()
    """Qwen3-VL DeepStack: ViT blocks whose outputs go through mergers of their own and are added to the LLM's
    hidden states at the visual positions, after decoder layer 0, 1, ... in this order; empty = none."""

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size if self.intermediate_size else int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row fed to the patch embedding: C * T * P * P (1176 at patch 14, 1536 at 16)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class TextConfig:
    """The decoder (Qwen2, or Qwen3 with QK-norm) with multimodal rotary embedding (M-RoPE)."""

    vocab_size: int = 151936
    """Vocabulary size (embedding and LM head rows)."""
    hidden_size: int = 1536
    """Decoder width."""
    intermediate_size: int = 8960
    """SwiGLU hidden width."""
    num_layers: int = 28
    """Number of decoder layers."""
    num_heads: int = 12
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (GQA)."""
    head_dim_override: int | None = None
    """Attention head width when it is not hidden_size / num_heads (Qwen3-VL: 128); null = hidden_size / num_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    rope_theta: float = 1_000_000.0
    """Base of the rotary embedding."""
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    """Rotary frequency pairs given to the (temporal, height, width) position streams; sums to head_dim / 2."""
    mrope_interleaved: bool = False
    """Qwen3-VL: the three streams' frequencies interleave (t, h, w, t, h, w, ...) instead of lying in three
    contiguous sections."""
    qkv_bias: bool = True
    """Biases on the q/k/v projections (Qwen2: yes; Qwen3: no)."""
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head of q and k before the rotary embedding."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head."""
    max_position_embeddings: int = 32768
    """Kept for HF config round trips; M-RoPE itself has no table."""
    hidden_act: str = "silu"
    """SwiGLU activation."""

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """A whole vision-language model: ViT + merger + decoder, of one model family."""

    family: str = "qwen2_vl"
    """Model family: 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl' (model/family.py)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """ViT and merger."""
    text: TextConfig = field(default_factory=TextConfig)
    """Decoder."""
    image_token_id: int = IMAGE_PAD_ID
    """Token whose positions receive image embeddings."""
    video_token_id: int = VIDEO_PAD_ID
    """Token whose positions receive video embeddings."""
    vision_start_token_id: int = VISION_START_ID
    """Token that opens a vision block (used by the position-id algorithm)."""
    vision_end_token_id: int = VISION_END_ID
    """Token that closes a vision block."""
    attn_backend: Literal["auto", "flash", "torch_varlen", "flex", "sdpa"] = "auto"
    """Attention kernel: 'auto' (flash-attn varlen if importable on CUDA, else torch varlen, else SDPA),
    'flash', 'torch_varlen', 'flex' (flex_attention with a block-sparse document mask) or 'sdpa'."""

    def validate(self) -> None:
        """Raise ValueError with the offending numbers if the shapes cannot work. These are the checks every family
        shares; model.family.check_config adds the family's own (this module names no family)."""
        v, t = self.vision, self.text
        if v.embed_dim % v.num_heads:
            raise ValueError(f"vision.embed_dim={v.embed_dim} is not divisible by vision.num_heads={v.num_heads}")
        if v.head_dim % 4:
            raise ValueError(f"vision head_dim={v.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if t.head_dim_override is None and t.hidden_size % t.num_heads:
            raise ValueError(f"text.hidden_size={t.hidden_size} is not divisible by text.num_heads={t.num_heads}")
        if t.num_heads % t.num_kv_heads:
            raise ValueError(f"text.num_heads={t.num_heads} is not divisible by text.num_kv_heads={t.num_kv_heads}")
        if sum(t.mrope_section) * 2 != t.head_dim:
            raise ValueError(
                f"text.mrope_section={tuple(t.mrope_section)} sums to {sum(t.mrope_section)}, "
                f"but must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if self.attn_backend not in ("auto", "flash", "torch_varlen", "flex", "sdpa"):
            raise ValueError(f"attn_backend={self.attn_backend!r}; choose auto, flash, torch_varlen, flex or sdpa")

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)
