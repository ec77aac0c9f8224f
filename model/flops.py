"""Training FLOPs of a packed microbatch of any family (ViT + merger(s) + LLM), for MFU.

What is counted: every matmul the model runs (linear layers, the patch embedding, which is a matmul over the
pixel rows, the two attention matmuls QK^T and PV, the mergers (Qwen3-VL's DeepStack mergers included), the LM
head). A matmul of (m x k) by
(k x n) is 2*m*k*n FLOPs. Elementwise work (norms, rotary, softmax, activations, the loss) is not counted:
it is memory-bound and well under 1% of the total. This is the convention of PaLM/Megatron MFU and of
torch.utils.flop_counter.FlopCounterMode, against which tests/model/test_flops.py checks this module
exactly (matmul for matmul).

Attention pairs (query, key) are counted in one of three conventions, each named by what it counts
(`attention=`; ATTENTION_CONVENTIONS), 4 * pairs * width FLOPs forward per layer:
  doc_causal   each packed document's causal pairs, L(L+1)/2 for a document of L tokens: the work a varlen causal
               kernel does (packed samples never attend to each other). The default and the honest figure.
  doc_full     each document's L^2 pairs: a dense per-document kernel (what a FLOP counter sees on per-segment
               SDPA, the check of tests/model/test_flops.py).
  packed_full  the whole packed row of T tokens as one sequence, T^2 pairs, no causal discount: torchtitan's
               convention (12 * layers * heads * head_dim * seq_len per token, seq_len = the packed length).
They concern the decoder; the bidirectional ViT's attention is always its real segments' (frame pairs, or
Qwen2.5-VL's windows in its window blocks), L^2 pairs each. Say which one when reporting MFU.

Backward, per matmul: one more forward-sized matmul for the input gradient (needed when anything upstream
trains) and one for the weight gradient (needed when that weight trains). Fully trainable, this is the
usual "backward = 2 x forward", i.e. forward + backward = 3 x forward, except for the first matmul of each
tower (patch embedding), whose input is data and needs no gradient. Frozen groups make it cheaper:
stage 1 (LLM frozen) still back-propagates THROUGH the LLM to reach the vision tokens (2x forward) but
computes no LLM weight gradients; stage 3 (ViT + merger frozen) runs the ViT forward only.

The LM head runs only on supervised positions (model/loss.py); pass n_supervised to count exactly that.
The zero-weighted dummy ViT pass of a text-only microbatch (4 patches) is not counted.

Shape names: T = packed LLM tokens, N = ViT patches, S = supervised tokens, D = LLM width, F = SwiGLU width,
C = ViT width, P = pixel row length, M = merged vision tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from model.config import ModelConfig
from model.family import GROUPS

ATTENTION_CONVENTIONS = ("doc_causal", "doc_full", "packed_full")
"""How the decoder's attention pairs are counted (the module docstring says what each counts)."""


def _lengths(cu_seqlens: torch.Tensor | Sequence[int]) -> list[int]:
    b = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    return [e - s for s, e in zip(b[:-1], b[1:])]


def _grid_rows(grids) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    if isinstance(grids, torch.Tensor):
        return [tuple(int(x) for x in r) for r in grids.reshape(-1, 3).tolist()]
    rows = []
    for g in grids:
        rows.extend(_grid_rows(g) if isinstance(g, torch.Tensor) else [tuple(int(x) for x in g)])
    return rows


def _bwd_factor(input_grad: bool, weight_grad: bool) -> int:
    """Forward + backward multiplier of one weight matmul."""
    return 1 + int(input_grad) + int(weight_grad)


def _segment_pairs(cu_seqlens: torch.Tensor) -> int:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return int((lengths * lengths).sum())


def vit_forward_flops(cfg: ModelConfig, grid_thw_rows: Iterable[tuple[int, int, int]]) -> dict[str, int]:
    """Forward FLOPs of the ViT on these images/videos, split by kind of matmul."""
    v = cfg.vision
    C, Fv, P = v.embed_dim, v.mlp_dim, v.patch_dim
    m2 = v.spatial_merge_size**2
    grids = [tuple(g) for g in grid_thw_rows]
    N = sum(t * h * w for t, h, w in grids)
    M = N // m2
    # Attention pairs per block: every frame pair is one bidirectional segment; Qwen2.5-VL's window blocks attend
    # within windows instead.
    full_pairs = sum(t * (h * w) ** 2 for t, h, w in grids)
    n_window_blocks = v.depth - len(v.fullatt_block_indexes) if v.window_size else 0
    window_pairs = 0
    if n_window_blocks and grids:
        from model.qwen2_5_vl import window_index  # the family's own window layout

        _, cu = window_index(torch.tensor(grids), v.spatial_merge_size, v.window_size // v.spatial_merge_size
                             // v.patch_size)
        window_pairs = _segment_pairs(cu)
    mlp_mats = 3 if v.hidden_act == "silu" else 2  # SwiGLU (gate, up, down) or fc1, fc2
    merger_fc1, merger_fc2 = 2 * M * (m2 * C) * (m2 * C), 2 * M * (m2 * C) * cfg.text.hidden_size
    return {
        "patch_embed": 2 * N * P * C,
        "blocks_linear": v.depth * 2 * N * (4 * C * C + mlp_mats * C * Fv),  # q, k, v, o; the MLP
        "blocks_attention": 4 * C * ((v.depth - n_window_blocks) * full_pairs + n_window_blocks * window_pairs),
        "merger_fc1": merger_fc1,
        "merger_fc2": merger_fc2,
        # Qwen3-VL's DeepStack mergers: the merger's shape, in the vision group (they only see ViT features).
        "deepstack": len(v.deepstack_visual_indexes) * (merger_fc1 + merger_fc2),
        "patches": N,
    }


def attention_pairs(seq_lengths: Iterable[int], attention: str = "doc_causal") -> int:
    """(query, key) pairs of one decoder layer over packed documents of these lengths, in `attention`'s
    convention (ATTENTION_CONVENTIONS)."""
    lengths = list(seq_lengths)
    if attention == "doc_causal":
        return sum(L * (L + 1) // 2 for L in lengths)
    if attention == "doc_full":
        return sum(L * L for L in lengths)
    if attention == "packed_full":
        return sum(lengths) ** 2
    raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_CONVENTIONS}")


def llm_forward_flops(
    cfg: ModelConfig, seq_lengths: Iterable[int], *, n_supervised: int | None = None, attention: str = "doc_causal"
) -> dict[str, int]:
    """Forward FLOPs of the decoder + head on packed samples of these lengths."""
    t = cfg.text
    D, F, Dh = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_heads * Dh, t.num_kv_heads * Dh
    lengths = list(seq_lengths)
    T = sum(lengths)
    S = T if n_supervised is None else n_supervised
    return {
        "layers_linear": t.num_layers * 2 * T * (2 * D * q + 2 * D * kv + 3 * D * F),  # q, o; k, v; gate, up, down
        "layers_attention": t.num_layers * 4 * attention_pairs(lengths, attention) * t.num_heads * Dh,
        "head": 2 * S * D * t.vocab_size,
        "tokens": T,
    }


def batch_flops(
    cfg: ModelConfig,
    cu_seqlens: torch.Tensor | Sequence[int],
    vision_grid_thw: torch.Tensor | Sequence | None = None,
    *,
    n_supervised: int | None = None,
    trainable: Iterable[str] = GROUPS,
    attention: str = "doc_causal",
) -> dict[str, int | float]:
    """FLOPs of one forward + backward over a packed microbatch.

    cu_seqlens: LLM sample boundaries (S+1,); vision_grid_thw: all image AND video grids of the microbatch
    (a (K, 3) tensor, a list of such tensors, or (t, h, w) tuples); n_supervised: positions the LM head runs
    on (None = every token); trainable: subset of GROUPS whose weights get gradients; attention: how the
    decoder's attention pairs are counted (ATTENTION_CONVENTIONS).

    Returns ints: vit (ViT + merger), llm (decoder + head), total, their forward-only parts vit_fwd / llm_fwd,
    tokens (T), and per_token = total / T (float) for MFU = per_token * tokens_per_second / peak_flops.
    """
    train = set(trainable)
    if unknown := train - set(GROUPS):
        raise ValueError(f"unknown trainable groups {sorted(unknown)}; choose from {GROUPS}")
    tv, tm, tl = "vision" in train, "merger" in train, "llm" in train
    vf = vit_forward_flops(cfg, _grid_rows(vision_grid_thw))
    lf = llm_forward_flops(cfg, _lengths(cu_seqlens), n_supervised=n_supervised, attention=attention)
    # Autograd computes an input gradient only where something upstream trains.
    vit = (
        vf["patch_embed"] * _bwd_factor(False, tv)
        + vf["blocks_linear"] * _bwd_factor(tv, tv)
        + vf["blocks_attention"] * (3 if tv else 1)
        # fc1's input is the merger LayerNorm's output: it needs a gradient as soon as that norm trains.
        + (vf["merger_fc1"] + vf["merger_fc2"]) * _bwd_factor(tv or tm, tm)
        # The DeepStack mergers (merger group) open with their own norm, like the patch merger.
        + vf["deepstack"] * _bwd_factor(tv or tm, tm)
    )
    # The LLM input (token + vision embeddings) needs a gradient if the embeddings or anything in vision train.
    llm_in_grad = tv or tm or tl
    llm = (
        lf["layers_linear"] * _bwd_factor(llm_in_grad, tl)
        + lf["layers_attention"] * (3 if llm_in_grad else 1)
        + lf["head"] * _bwd_factor(llm_in_grad, tl)
    )
    vit_fwd = (vf["patch_embed"] + vf["blocks_linear"] + vf["blocks_attention"] + vf["merger_fc1"]
               + vf["merger_fc2"] + vf["deepstack"])
    llm_fwd = lf["layers_linear"] + lf["layers_attention"] + lf["head"]
    T = lf["tokens"]
    return {
        "vit": vit,
        "llm": llm,
        "total": vit + llm,
        "vit_fwd": vit_fwd,
        "llm_fwd": llm_fwd,
        "tokens": T,
        "patches": vf["patches"],
        "per_token": (vit + llm) / T if T else 0.0,
    }


def llm_flops_per_token(cfg: ModelConfig, seq_len: int, *, attention: str = "doc_causal") -> float:
    """Training (fwd + bwd, all trainable) FLOPs per token of the decoder + head for samples of seq_len
    tokens, every position supervised: the text-only MFU figure, e.g. for a dry run."""
    f = batch_flops(cfg, [0, seq_len], [], attention=attention)
    return f["llm"] / seq_len


def vit_flops_per_patch(cfg: ModelConfig, grid_hw: tuple[int, int] = (32, 32), *,
                        trainable: Iterable[str] = GROUPS) -> float:
    """Training FLOPs per ViT patch (ViT + merger; `trainable` as in batch_flops) for one image of grid_hw
    patches, e.g. for a dry run."""
    h, w = grid_hw
    f = batch_flops(cfg, [0, 0], [(1, h, w)], trainable=trainable)
    return f["vit"] / (h * w)
