"""Variable-length (packed) attention backends.

Shape legend: T = packed tokens (all samples concatenated), H = query heads, Hkv = key/value heads,
Dh = head dim, S = number of segments (samples, or ViT frame pairs), nB = blocks of FLEX_BLOCK tokens.

All backends take q_THDh, k_THkvDh, v_THkvDh and cu_seqlens (S+1,) int32 with cu_seqlens[0] == 0 and
cu_seqlens[-1] == T, and return o_THDh. Attention never crosses a segment boundary.

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16), when installed.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10): the flash
  kernel that ships inside torch. Work and memory follow sum(L_i^2), never T^2.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block-sparse document mask built from cu_seqlens on
  the device (no host sync): only the FLEX_BLOCK x FLEX_BLOCK tiles that touch one segment (and, causal, lie on
  or below the diagonal) are computed, so it is varlen too, in any dtype. The mask is built once per microbatch
  (cached_mask: every layer gets the same cu_seqlens tensor), not once per layer. On CUDA it runs compiled
  (Triton); on CPU it runs eagerly, forward only, materializing the scores (tests and evaluation only).
- ``sdpa``: ``scaled_dot_product_attention`` everywhere (CPU included). A single segment runs as one call.
  Several segments run either as one call with a block-diagonal (causal) boolean mask (on accelerators, and
  inside torch.compile: a constant kernel count and no host sync however many samples are packed, but T x T
  mask memory; eager, one mask per microbatch like flex's) or as one call per segment (eager CPU, where launches
  are cheap and the mask would cost T^2 work instead of sum(L_i^2)). Both are exact; tests check them against a
  plain softmax reference.

GQA (Hkv < H): no backend copies the kv heads where its kernel takes them grouped: flash-attn natively,
torch_varlen with enable_gqa (torch >= 2.13; older releases repeat them), flex with enable_gqa, SDPA with
enable_gqa where its kernel takes it and otherwise with the kv heads as the batch over a zero-stride view
(sdpa_heads).

'auto' picks flash, then torch_varlen on CUDA in half precision, else sdpa: fp32 on CUDA is a parity/debug
setting, where the SDPA mask is acceptable. 'flex' is opt-in (the GPU suite measures it against torch_varlen).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "torch_varlen", "flex", "sdpa")
"""Names accepted by varlen_attention(backend=...) and ModelConfig.attn_backend."""
FLEX_BLOCK = 128
"""Tile size of the flex block mask (flex_attention's default block size)."""


_MASK_CACHE_SIZE = 8
"""Masks kept (a pipeline holds several microbatches in flight; the ViT's full and window blocks have one each)."""
_mask_cache: list[tuple[weakref.ref, int, tuple, Any]] = []


def _drop_dead_masks(_ref: weakref.ref | None = None) -> None:
    _mask_cache[:] = [e for e in _mask_cache if e[0]() is not None]


def cached_mask(build: Callable[..., Any], cu_seqlens: torch.Tensor, total: int, causal: bool) -> Any:
    """build(cu_seqlens, total, causal), built once per microbatch rather than once per layer.

    Every layer of one forward (and its recompute in backward) receives the same cu_seqlens tensor, so the mask is
    keyed by that tensor's identity (held weakly: the entry goes with the microbatch) and its version counter (an
    in-place change rebuilds). Inside torch.compile the mask is built in the graph, as before: no cache lookups
    are traced."""
    if torch.compiler.is_compiling():
        return build(cu_seqlens, total, causal)
    key = (build, total, causal)
    for ref, version, k, mask in _mask_cache:
        if ref() is cu_seqlens and version == cu_seqlens._version and k == key:
            return mask
    mask = build(cu_seqlens, total, causal)
    _mask_cache.insert(0, (weakref.ref(cu_seqlens, _drop_dead_masks), cu_seqlens._version, key, mask))
    del _mask_cache[_MASK_CACHE_SIZE:]
    return mask


def _import_kernels() -> dict[str, Any]:
    """Every optional kernel, imported once when this module loads, so the accessors below only read a dict:
    inside a compiled block dynamo traces a constant lookup, never an import (flash_attn's loads a CUDA
    extension) or a cache wrapper."""
    out: dict[str, Any] = {"flash": None, "torch_varlen": None, "torch_varlen_params": frozenset(), "flex": None}
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        out["flash"] = flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["torch_varlen"] = varlen_attn
        # Keyword names of this torch's varlen_attn: 2.10 takes is_causal, later releases window_size and (2.13)
        # enable_gqa. Read from the signature instead of trying calls (a TypeError raised inside the kernel
        # would otherwise be mistaken for a signature mismatch).
        out["torch_varlen_params"] = frozenset(inspect.signature(varlen_attn).parameters)
    except Exception:  # noqa: BLE001
        pass
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        out["flex"] = (flex_attention, BlockMask)
    except Exception:  # noqa: BLE001
        pass
    return out


_KERNELS = _import_kernels()


def _flash_varlen():
    return _KERNELS["flash"]


def _torch_varlen():
    return _KERNELS["torch_varlen"]


def _torch_varlen_params() -> frozenset[str]:
    return _KERNELS["torch_varlen_params"]


def _flex():
    return _KERNELS["flex"]


@functools.cache
def _flex_compiled():
    # dynamic=True: one kernel family for every packed length (T changes every step).
    return torch.compile(_flex()[0], dynamic=True)


def available_backends(device: torch.device, dtype: torch.dtype, training: bool = True) -> list[str]:
    """The concrete backends that can run on `device` in `dtype` here (sdpa always). flex runs forward only on
    CPU (torch has no CPU flex backward outside torch.compile), so it is listed there only for training=False."""
    half = dtype in (torch.float16, torch.bfloat16)
    out = []
    if device.type == "cuda" and half and _flash_varlen() is not None:
        out.append("flash")
    if device.type == "cuda" and half and _torch_varlen() is not None:
        out.append("torch_varlen")
    if _flex() is not None and (device.type != "cpu" or not training):
        out.append("flex")
    out.append("sdpa")
    return out


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete backend for 'auto' (or check a requested one is usable)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}; choose one of {BACKENDS}")
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
    if name in ("flash", "torch_varlen") and not (device.type == "cuda" and half):
        raise ValueError(f"attn_backend={name!r} runs on CUDA in fp16/bf16 only (got {device.type}, {dtype}); "
                         "use 'auto', 'flex' or 'sdpa'")
    if name == "flex" and _flex() is None:
        raise ValueError("attn_backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
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


def sdpa_takes_grouped_kv(q: torch.Tensor, masked: bool) -> bool:
    """Whether the SDPA kernel this call reaches reads Hkv < H key/value heads itself (enable_gqa).

    CPU: its flash kernel does, with or without a mask. CUDA: the flash kernel does (half precision, no mask);
    the efficient and cuDNN kernels take a mask and fp32 but not, in every torch release this project supports,
    fewer kv heads: there enable_gqa would fall back to the math kernel (T x T fp32 scores, kv heads repeated)."""
    if q.device.type == "cpu":
        return True
    return not masked and q.dtype in (torch.float16, torch.bfloat16)


def sdpa_heads(q_THDh, k_SHkvDh, v_SHkvDh, causal: bool, scale: float | None, mask_TS=None) -> torch.Tensor:
    """One SDPA call over all heads (T queries, S keys); GQA without copying the key/value heads.

    Where the kernel takes grouped heads (sdpa_takes_grouped_kv), enable_gqa. Elsewhere the call is made with
    the kv heads as the batch: queries (Hkv, H / Hkv, T, Dh) and keys expanded (a zero-stride view, no copy) to
    (Hkv, H / Hkv, S, Dh), so query head h meets kv head h // (H / Hkv), as repeat_interleave would pair them."""
    # SDPA wants (batch, heads, tokens, head_dim).
    q_1HTD = q_THDh.transpose(0, 1).unsqueeze(0)
    k_1HSD = k_SHkvDh.transpose(0, 1).unsqueeze(0)
    v_1HSD = v_SHkvDh.transpose(0, 1).unsqueeze(0)
    n_q, n_kv = q_1HTD.shape[1], k_1HSD.shape[1]
    kw: dict[str, Any] = {"scale": scale}
    if mask_TS is None:
        kw["is_causal"] = causal
    else:
        kw["attn_mask"] = mask_TS
    # Branches, not values: compiled with dynamic shapes the head counts are symbols, and the kernels take a
    # plain bool (a branch becomes a guard on the head counts, which never change).
    if n_q == n_kv:
        o_1HTD = F.scaled_dot_product_attention(q_1HTD, k_1HSD, v_1HSD, **kw)
    elif sdpa_takes_grouped_kv(q_THDh, mask_TS is not None):
        o_1HTD = F.scaled_dot_product_attention(q_1HTD, k_1HSD, v_1HSD, enable_gqa=True, **kw)
    else:
        T, S, Dh, rep = q_1HTD.shape[2], k_1HSD.shape[2], q_1HTD.shape[3], n_q // n_kv
        q_GrTD = q_1HTD.view(n_kv, rep, T, Dh)
        k_GrSD = k_1HSD.view(n_kv, 1, S, Dh).expand(n_kv, rep, S, Dh)
        v_GrSD = v_1HSD.view(n_kv, 1, S, v_1HSD.shape[3]).expand(n_kv, rep, S, v_1HSD.shape[3])
        o_GrTD = F.scaled_dot_product_attention(q_GrTD, k_GrSD, v_GrSD, **kw)
        return o_GrTD.permute(2, 0, 1, 3).reshape(T, n_q, -1)
    return o_1HTD.squeeze(0).transpose(0, 1)


def sdpa_block_mask(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, *, causal: bool, scale: float | None = None):
    """All segments in one SDPA call with a block-diagonal (causal) mask."""
    if cu_seqlens.numel() <= 2:
        return sdpa_heads(q_THDh, k_THkvDh, v_THkvDh, causal, scale)
    mask_TT = cached_mask(block_mask, cu_seqlens, q_THDh.shape[0], causal)
    return sdpa_heads(q_THDh, k_THkvDh, v_THkvDh, False, scale, mask_TT)


def sdpa_segment_loop(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, *, causal: bool, scale: float | None = None):
    """One SDPA call per segment (reads the boundaries on the host)."""
    bounds = cu_seqlens.tolist()
    if len(bounds) <= 2:
        return sdpa_heads(q_THDh, k_THkvDh, v_THkvDh, causal, scale)
    outs = [
        sdpa_heads(q_THDh[s:e], k_THkvDh[s:e], v_THkvDh[s:e], causal, scale)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    return torch.cat(outs, dim=0)


def _sdpa(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal: bool, scale: float | None) -> torch.Tensor:
    # Under torch.compile the per-segment loop would read cu_seqlens on the host (a graph break, and a
    # recompile per distinct set of lengths): the mask form traces into one graph for every length.
    # Compiled, the mask is built for one segment too: no graph specialization on the segment count.
    if torch.compiler.is_compiling():
        return sdpa_heads(q_THDh, k_THkvDh, v_THkvDh, False, scale, block_mask(cu_seqlens, q_THDh.shape[0], causal))
    if q_THDh.device.type == "cpu":
        return sdpa_segment_loop(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)
    return sdpa_block_mask(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)


def _pack_first(keep_nn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count (nB,), indices (nB, nB)) of the True columns of each row, those columns first (flex's layout)."""
    num_n = keep_nn.sum(-1, dtype=torch.int32)
    idx_nn = torch.argsort((~keep_nn).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num_n, idx_nn


def flex_block_mask(cu_seqlens: torch.Tensor, total: int, causal: bool, block: int = FLEX_BLOCK):
    """flex_attention's BlockMask for packed segments, computed on cu_seqlens' device without a host sync.

    Tile (i, j) of queries i*block.. and keys j*block.. is computed when some query and key in it share a
    segment (and, causal, j <= i); it is FULL (no mask applied inside) when both tiles lie in one and the same
    segment and, causal, j < i. The mask_mod decides element by element in the partial tiles."""
    _, BlockMask = _flex()
    dev = cu_seqlens.device
    cu_S1 = cu_seqlens.to(torch.int64)
    seg_T = segment_ids(cu_S1, total)
    nb = -(-total // block)
    start_n = torch.arange(nb, device=dev) * block
    end_n = torch.clamp(start_n + block, max=total) - 1
    first_n, last_n = seg_T[start_n], seg_T[end_n]
    # A query tile spans the segments first..last: keys from the first one's start to the last one's end.
    lo_n = cu_S1[first_n] // block
    hi_n = torch.arange(nb, device=dev) if causal else (cu_S1[last_n + 1] - 1) // block
    j_1n = torch.arange(nb, device=dev)[None, :]
    touch_nn = (j_1n >= lo_n[:, None]) & (j_1n <= hi_n[:, None])
    single_n = first_n == last_n
    full_nn = single_n[:, None] & single_n[None, :] & (first_n[:, None] == first_n[None, :])
    if causal:
        full_nn &= j_1n < torch.arange(nb, device=dev)[:, None]
    partial_nn = touch_nn & ~full_nn
    kv_num, kv_idx = _pack_first(partial_nn)
    full_num, full_idx = _pack_first(full_nn)

    def mask_mod(b, h, q_idx, kv_idx_):  # noqa: ARG001 - flex's signature
        same = seg_T[q_idx] == seg_T[kv_idx_]
        return same & (q_idx >= kv_idx_) if causal else same

    return BlockMask.from_kv_blocks(
        kv_num[None, None], kv_idx[None, None], full_num[None, None], full_idx[None, None],
        BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(total, total),
    )


def flex_varlen(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, *, causal: bool, scale: float | None = None):
    """Packed attention through flex_attention with the block-sparse document mask (flex_block_mask)."""
    T = q_THDh.shape[0]
    bm = cached_mask(flex_block_mask, cu_seqlens, T, causal)
    q_1HTD = q_THDh.transpose(0, 1).unsqueeze(0)
    k_1HTD = k_THkvDh.transpose(0, 1).unsqueeze(0)
    v_1HTD = v_THkvDh.transpose(0, 1).unsqueeze(0)
    gqa = True if q_1HTD.shape[1] != k_1HTD.shape[1] else False  # noqa: SIM210 - see sdpa_heads
    # Eager flex materializes the scores; on CUDA run the compiled kernel. Inside a compiled layer the plain
    # function is traced into that layer's graph anyway.
    eager_ok = q_THDh.device.type == "cpu" or torch.compiler.is_compiling()
    fn = _flex()[0] if eager_ok else _flex_compiled()
    o_1HTD = fn(q_1HTD, k_1HTD, v_1HTD, block_mask=bm, scale=scale, enable_gqa=gqa)
    return o_1HTD.squeeze(0).transpose(0, 1)


def _torch_varlen_call(q_THDh, k_THkvDh, v_THkvDh, cu: torch.Tensor, max_seqlen: int, causal: bool,
                       scale: float | None) -> torch.Tensor:
    fn, params = _torch_varlen(), _torch_varlen_params()
    n_rep = q_THDh.shape[1] // k_THkvDh.shape[1]
    kw: dict = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if n_rep > 1 and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif n_rep > 1:
        # Releases without enable_gqa: repeat the kv heads (exact, costs kv memory).
        k_THkvDh = k_THkvDh.repeat_interleave(n_rep, dim=1)
        v_THkvDh = v_THkvDh.repeat_interleave(n_rep, dim=1)
    return fn(q_THDh, k_THkvDh, v_THkvDh, cu, cu, max_seqlen, max_seqlen, **kw)


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
    if backend == "flex":
        return flex_varlen(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)
    cu = cu_seqlens.to(torch.int32)
    if backend == "flash":
        return _flash_varlen()(
            q_THDh, k_THkvDh, v_THkvDh, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal
        )
    return _torch_varlen_call(q_THDh, k_THkvDh, v_THkvDh, cu, max_seqlen, causal, scale)
