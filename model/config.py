"""Qwen2-VL model configuration: typed dataclasses, published presets, HF config.json conversion.

The presets carry the published Qwen2-VL hyper-parameters (config.json of Qwen/Qwen2-VL-{2B,7B,72B}-Instruct):
one 675M-parameter ViT (32 blocks, width 1280, 16 heads) shared by all three sizes, a 2x2 patch merger
projecting into the LLM width, and a Qwen2 decoder with M-RoPE sections (16, 24, 24).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Special token ids of the Qwen2 tokenizer (checked against the real tokenizer files in the tests).
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656


@dataclass
class VisionConfig:
    """The Qwen2-VL ViT (naive dynamic resolution, 2D-RoPE) and its patch merger."""

    depth: int = 32
    """Number of ViT blocks."""
    embed_dim: int = 1280
    """ViT width."""
    num_heads: int = 16
    """ViT attention heads (head_dim = embed_dim / num_heads)."""
    mlp_ratio: float = 4.0
    """ViT MLP hidden width = embed_dim * mlp_ratio."""
    hidden_act: str = "quick_gelu"
    """ViT MLP activation (Qwen2-VL: QuickGELU)."""
    in_channels: int = 3
    """Image channels (RGB)."""
    patch_size: int = 14
    """Spatial patch size of the Conv3d patch embedding."""
    temporal_patch_size: int = 2
    """Temporal patch size: an image is two identical frames, a video is split in frame pairs."""
    spatial_merge_size: int = 2
    """The merger compresses each spatial_merge_size x spatial_merge_size window into one LLM token."""
    rope_theta: float = 10000.0
    """Base of the ViT's 2D rotary embedding."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the ViT LayerNorms (and the merger's)."""

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row fed to the patch embedding: C * T * P * P (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class TextConfig:
    """The Qwen2 decoder with multimodal rotary embedding (M-RoPE)."""

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
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    rope_theta: float = 1_000_000.0
    """Base of the rotary embedding."""
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    """Rotary frequency pairs given to the (temporal, height, width) position streams; sums to head_dim / 2."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head."""
    max_position_embeddings: int = 32768
    """Kept for HF config round trips; M-RoPE itself has no table."""
    hidden_act: str = "silu"
    """SwiGLU activation."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """A whole Qwen2-VL model: ViT + merger + Qwen2 decoder."""

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
        """Raise ValueError with the offending numbers if the shapes cannot work."""
        v, t = self.vision, self.text
        if v.embed_dim % v.num_heads:
            raise ValueError(f"vision.embed_dim={v.embed_dim} is not divisible by vision.num_heads={v.num_heads}")
        if v.head_dim % 4:
            raise ValueError(f"vision head_dim={v.head_dim} must be a multiple of 4 for the 2D rotary embedding")
        if t.hidden_size % t.num_heads:
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

    # ---------------------------------------------------------------- HF config.json conversion
    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-compatible Qwen2-VL config.json (flat 4.x-style keys, which 4.x and 5.x both read)."""
        v, t = self.vision, self.text
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": 151643,
            "eos_token_id": IM_END_ID,
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

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Qwen2-VL config.json written by transformers 4.x (flat) or 5.x (text_config nested)."""
        if d.get("model_type") not in (None, "qwen2_vl"):
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}, expected 'qwen2_vl'")
        text = dict(d)
        if isinstance(d.get("text_config"), dict):
            # 5.x nests the decoder's keys; flat keys, where present, are the same values.
            text = {**d, **d["text_config"]}
        vd = d.get("vision_config", {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = text.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"config.json rope type {rope_type!r} is not supported; Qwen2-VL uses plain M-RoPE")
        if text.get("use_sliding_window"):
            raise ValueError("config.json sets use_sliding_window=true; Qwen2-VL checkpoints use full attention "
                             "and this framework implements only that")
        v_rope = vd.get("rope_parameters") or {}
        v_theta = float(vd.get("rope_theta", v_rope.get("rope_theta", 10000.0)))
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
            rope_theta=v_theta,
        )
        tc = TextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            hidden_act=text.get("hidden_act", "silu"),
        )
        if vd.get("hidden_size", tc.hidden_size) != tc.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size={vd.get('hidden_size')} (merger output) != hidden_size={tc.hidden_size}"
            )
        cfg = cls(
            vision=vision,
            text=tc,
            image_token_id=d.get("image_token_id", IMAGE_PAD_ID),
            video_token_id=d.get("video_token_id", VIDEO_PAD_ID),
            vision_start_token_id=d.get("vision_start_token_id", VISION_START_ID),
            vision_end_token_id=d.get("vision_end_token_id", VISION_END_ID),
        )
        cfg.validate()
        return cfg

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------ presets
def _qwen2vl_vit() -> VisionConfig:
    # The 675M ViT shared by 2B, 7B and 72B (DFN-derived, 32 blocks x 1280 wide).
    return VisionConfig()


def tiny() -> ModelConfig:
    """A tiny random model for CPU tests and the demo. Keeps the real vocabulary size so the real
    Qwen2 tokenizer's ids (vision pads at 151655/151656) are valid, and untied embeddings so both
    head layouts stay exercised (2B ties them, 7B/72B do not)."""
    return ModelConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(2, 3, 3),
            tie_word_embeddings=False,
        ),
    )


def qwen2vl_2b() -> ModelConfig:
    """Qwen2-VL-2B: 1.5B Qwen2 decoder (tied embeddings) + 675M ViT."""
    return ModelConfig(
        vision=_qwen2vl_vit(),
        text=TextConfig(
            hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
            tie_word_embeddings=True,
        ),
    )


def qwen2vl_7b() -> ModelConfig:
    """Qwen2-VL-7B: 7.6B Qwen2 decoder + 675M ViT."""
    return ModelConfig(
        vision=_qwen2vl_vit(),
        text=TextConfig(
            hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
            tie_word_embeddings=False,
        ),
    )


def qwen2vl_72b() -> ModelConfig:
    """Qwen2-VL-72B: 72B Qwen2 decoder + 675M ViT."""
    return ModelConfig(
        vision=_qwen2vl_vit(),
        text=TextConfig(
            hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64, num_kv_heads=8,
            tie_word_embeddings=False,
        ),
    )


PRESETS = {"tiny": tiny, "2b": qwen2vl_2b, "7b": qwen2vl_7b, "72b": qwen2vl_72b}


def get_preset(name: str) -> ModelConfig:
    """Return a fresh preset config by name ('tiny', '2b', '7b', '72b')."""
    try:
        cfg = PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    cfg.validate()
    return cfg
