"""State-dict conversion between Hugging Face Qwen2-VL checkpoints and our modules.

Key layouts read:
- hub layout (what transformers 4.x and 5.x write to disk): `visual.*`, `model.*` (decoder), `lm_head.*`;
- transformers >= 4.52 / 5.x in-memory layout: `model.visual.*`, `model.language_model.*`, `lm_head.*`.
Written: the hub layout.

Ours differs only where tensor parallelism wants it: the ViT attention's fused `qkv` is split into
q/k/v projections (rows [q; k; v]) and `attn.proj` is called `attn.o_proj`; decoder keys lose the `model.`
prefix.
"""

from __future__ import annotations

import re

import torch

_VIS_QKV = re.compile(r"^visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_VIS_PROJ = re.compile(r"^visual\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$")


def normalize_hf_key(key: str) -> str:
    """Map any supported HF layout to the hub layout."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def from_hf_state_dict(sd: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF (either layout) -> ours. Tensors are not copied where no split is needed."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        k = normalize_hf_key(key)
        if m := _VIS_QKV.match(k):
            q, kk, v = t.chunk(3, dim=0)
            base = f"visual.blocks.{m[1]}.attn"
            out[f"{base}.q_proj.{m[2]}"], out[f"{base}.k_proj.{m[2]}"], out[f"{base}.v_proj.{m[2]}"] = q, kk, v
        elif m := _VIS_PROJ.match(k):
            out[f"visual.blocks.{m[1]}.attn.o_proj.{m[2]}"] = t
        elif k.startswith("visual."):
            out[k] = t
        elif k.startswith("model."):
            out[k[len("model.") :]] = t
        elif k == "lm_head.weight":
            if not tie_word_embeddings:
                out[k] = t
        else:
            raise KeyError(f"unexpected key in Qwen2-VL checkpoint: {key!r}")
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Ours -> HF hub layout (q/k/v fused back into `qkv`)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        m = re.match(r"^visual\.blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$", k)
        if m:
            if m[2] == "o_proj":
                out[f"visual.blocks.{m[1]}.attn.proj.{m[3]}"] = t
            else:
                pending.setdefault((m[1], m[3]), {})[m[2]] = t
        elif k.startswith("visual."):
            out[k] = t
        elif k == "lm_head.weight":
            if not tie_word_embeddings:
                out[k] = t
        else:
            out["model." + k] = t
    for (blk, kind), parts in pending.items():
        out[f"visual.blocks.{blk}.attn.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out
