"""Variable-length (packed) attention backends.

Shape legend: T = packed tokens (all samples concatenated), H = query heads, Hkv = key/value heads,
Dh = head dim, S = number of segments (samples, or ViT temporal slices).

All backends take q_THDh, k_THkvDh, v_THkvDh and cu_seqlens (S+1,) int32 with cu_seqlens[0] == 0 and
cu_seqlens[-1] == T, and return o_THDh. Attention never crosses a segment boundary.

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16), when installed.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10).
- ``sdpa``: ``scaled_dot_product_attention`` everywhere (CPU included). A single segment runs as one
  call. Several segments run either as one call with a block-diagonal (causal) boolean mask (on
  accelerators: a constant kernel count and no host sync however many samples are packed) or as one
  call per segment (on CPU, where launches are cheap and the mask would cost T^2 work and memory instead of
  sum(L_i^2), and would force SDPA off its fused causal kernel). Both are exact; tests check them against
  a plain softmax reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001
        return None
    return varlen_attn


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete backend for 'auto' (or check a requested one is usable)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if device.type == "cuda" and half and _flash_varlen() is not None:
            return "flash"
        if device.type == "cuda" and half and _torch_varlen() is not None:
            return "torch_varlen"
        return "sdpa"
    if name == "flash" and _flash_varlen() is None:
        raise ValueError("attn_backend='flash' but flash_attn is not importable; install the 'gpu' extra")
    if name == "torch_varlen" and _torch_varlen() is None:
        raise ValueError("attn_backend='torch_varlen' needs torch.nn.attention.varlen (torch >= 2.10)")
    return name


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """seg_T: the segment index of every packed position."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def block_mask(cu_seqlens: torch.Tensor, total: int, causal: bool) -> torch.Tensor:
    """mask_TT (True = may attend): same segment, and key <= query when causal."""
    seg_T = segment_ids(cu_seqlens, total)
    mask_TT = seg_T[:, None] == seg_T[None, :]
    if causal:
        mask_TT = mask_TT & torch.ones(total, total, dtype=torch.bool, device=seg_T.device).tril_()
    return mask_TT


def _sdpa_one(q_THDh, k_THkvDh, v_THkvDh, causal: bool, scale: float | None, mask_TT=None) -> torch.Tensor:
    # SDPA wants (batch, heads, tokens, head_dim).
    q_1HTD = q_THDh.transpose(0, 1).unsqueeze(0)
    k_1HTD = k_THkvDh.transpose(0, 1).unsqueeze(0)
    v_1HTD = v_THkvDh.transpose(0, 1).unsqueeze(0)
    gqa = q_1HTD.shape[1] != k_1HTD.shape[1]
    if mask_TT is None:
        o_1HTD = F.scaled_dot_product_attention(q_1HTD, k_1HTD, v_1HTD, is_causal=causal, scale=scale, enable_gqa=gqa)
    else:
        o_1HTD = F.scaled_dot_product_attention(q_1HTD, k_1HTD, v_1HTD, attn_mask=mask_TT, scale=scale, enable_gqa=gqa)
    return o_1HTD.squeeze(0).transpose(0, 1)


def sdpa_block_mask(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, *, causal: bool, scale: float | None = None):
    """All segments in one SDPA call with a block-diagonal (causal) mask."""
    if cu_seqlens.numel() <= 2:
        return _sdpa_one(q_THDh, k_THkvDh, v_THkvDh, causal, scale)
    mask_TT = block_mask(cu_seqlens, q_THDh.shape[0], causal)
    return _sdpa_one(q_THDh, k_THkvDh, v_THkvDh, False, scale, mask_TT)


def sdpa_segment_loop(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, *, causal: bool, scale: float | None = None):
    """One SDPA call per segment (reads the boundaries on the host)."""
    bounds = cu_seqlens.tolist()
    if len(bounds) <= 2:
        return _sdpa_one(q_THDh, k_THkvDh, v_THkvDh, causal, scale)
    outs = [
        _sdpa_one(q_THDh[s:e], k_THkvDh[s:e], v_THkvDh[s:e], causal, scale)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=0)


def _sdpa(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal: bool, scale: float | None) -> torch.Tensor:
    if q_THDh.device.type == "cpu":
        return sdpa_segment_loop(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)
    return sdpa_block_mask(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)


def varlen_attention(
    q_THDh: torch.Tensor,
    k_THkvDh: torch.Tensor,
    v_THkvDh: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed segments; returns o_THDh."""
    backend = resolve_backend(backend, q_THDh.device, q_THDh.dtype)
    if backend == "sdpa":
        return _sdpa(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal, scale)
    cu = cu_seqlens.to(torch.int32)
    if backend == "flash":
        return _flash_varlen()(
            q_THDh, k_THkvDh, v_THkvDh, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
        )
    # torch varlen_attn: GQA via enable_gqa where supported (2.13); older releases need repeated kv heads.
    fn = _torch_varlen()
    n_rep = q_THDh.shape[1] // k_THkvDh.shape[1]
    try:
        return fn(q_THDh, k_THkvDh, v_THkvDh, cu, cu, max_seqlen, max_seqlen, scale=scale,
                  window_size=(-1, 0) if causal else (-1, -1), enable_gqa=n_rep > 1)
    except TypeError:
        # torch 2.10-2.12 signature: is_causal flag, no GQA.
        k_rep = k_THkvDh.repeat_interleave(n_rep, dim=1) if n_rep > 1 else k_THkvDh
        v_rep = v_THkvDh.repeat_interleave(n_rep, dim=1) if n_rep > 1 else v_THkvDh
        return fn(q_THDh, k_rep, v_rep, cu, cu, max_seqlen, max_seqlen, is_causal=causal, scale=scale)
