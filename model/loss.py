"""Language-model loss head that never materializes the full [tokens x vocab] logits: the one fused kernel.

Shape legend: T = packed tokens, D = width, V = vocab, Vl = vocab rows held here (V, or V / tp when the head is
vocab-parallel), S = supervised tokens, c = chunk rows.

`labels_T` are already shifted: labels_T[t] is the token predicted at position t, IGNORE_INDEX where nothing is
supervised (vision tokens, prompts, the last token of each packed sample). Only the S supervised rows go
through the head, in chunks of `chunk_size` rows.

The head is one fused autograd Function (the approach of Liger-Kernel's fused linear cross-entropy): while
computing a chunk's logits in forward, it also turns them into d(loss)/d(logits) = softmax - onehot and
immediately contracts that with the weight and the hidden states into the chunk's d/dh and the running d/dW
(fp32 accumulator). The chunk's logits are then freed, so peak memory is ONE chunk of logits (c x Vl, fp32)
however long the sequence, and no logits are recomputed in backward: the head costs exactly the 3 matmuls of
forward + backward (1 when no gradient is needed, 2 when the weight is frozen). Backward only scales the stored
gradients by the incoming grad (e.g. 1 / global token count).

Two bodies compute a chunk's loss and softmax - onehot, with the same results (tested): on CUDA (with triton)
`_chunk_fused`, a row max and two compiled kernels that read the logits in their own dtype (bf16 under mixed
precision) three times and write the gradient once, no fp32 copy of the chunk ever written (a GPU is
bandwidth-bound here); elsewhere `_chunk_eager`, in place in one fp32 buffer (a CPU is bound by the exps, which
the fused body computes twice). benchmarks/bench_loss_head.py measures both.

Vocab parallelism is the same kernel with the weight's rows split over ranks (Megatron's vocab-parallel
cross-entropy): the caller passes `vocab_start` (the first row it holds) and a `VocabReduce` whose two in-place
all-reduces (MAX of the row maxima, SUM of target logit and sum of exp) make every rank's softmax exact; d/dh is
then this rank's partial sum over its rows (the caller sums it over ranks). This module itself never
communicates: parallel/vocab_parallel.py supplies the reductions.

NOTE: d/dW and d/dh are computed during forward whenever autograd records the call. Under torch.no_grad()
(evaluation) only the loss is computed.

Returns (loss_sum fp32, n_supervised int64): the trainer divides by the GLOBAL supervised-token count
(dp x microbatches), not by a per-microbatch mean.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from core.batch import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024
"""Rows per chunk: 1024 x 151936 fp32 logits = 0.62 GB transient, large enough for full-speed matmuls."""


class VocabReduce(Protocol):
    """In-place reductions over the ranks that share the vocabulary rows of one head."""

    def max_(self, t: torch.Tensor) -> None: ...

    def sum_(self, t: torch.Tensor) -> None: ...


def _chunk_eager(h_cD, w_VlD, idx_c, mine_c, reduce: VocabReduce | None, need_grad: bool):
    """(loss_c, d(loss)/d(logits) in h's dtype or None) of one chunk, in place in one fp32 buffer: the eager body
    (CPUs, compute-bound: one exp per logit matters more than the passes over memory)."""
    rows_c = torch.arange(idx_c.numel(), device=idx_c.device)
    logits_cVl = F.linear(h_cD, w_VlD).float()
    max_c = logits_cVl.amax(dim=-1)
    if reduce is not None:
        reduce.max_(max_c)
    # log-sum-exp by hand, in place: the buffer becomes logits - max, then exp, then the softmax, then
    # the gradient, with no second c x Vl allocation (torch.logsumexp would make one).
    p_cVl = logits_cVl.sub_(max_c[:, None])
    target_c = p_cVl[rows_c, idx_c]
    if mine_c is not None:
        target_c = torch.where(mine_c, target_c, torch.zeros_like(target_c))
    p_cVl = p_cVl.exp_()
    sum_c = p_cVl.sum(dim=-1)
    if reduce is not None:
        both_2c = torch.stack([target_c, sum_c])
        reduce.sum_(both_2c)
        target_c, sum_c = both_2c[0], both_2c[1]
    loss_c = (sum_c.log() - target_c).sum()
    if not need_grad:
        return loss_c, None
    # d(loss)/d(logits) = softmax - onehot (the onehot only where this rank holds the target row)
    g_cVl = p_cVl.div_(sum_c[:, None])
    g_cVl[rows_c, idx_c] -= 1.0 if mine_c is None else mine_c.to(g_cVl.dtype)
    return loss_c, g_cVl.to(h_cD.dtype)


def _softmax_stats(logits_cVl, max_c, idx_c, mine_c):
    """(sum of exp(logits - max), target logit (0 where this rank does not hold it)), fp32, one read of the
    logits in their own dtype."""
    x_cVl = logits_cVl.float()
    sum_c = torch.exp(x_cVl - max_c[:, None]).sum(dim=-1)
    target_c = x_cVl.gather(1, idx_c[:, None]).squeeze(1)
    if mine_c is not None:
        target_c = torch.where(mine_c, target_c, torch.zeros_like(target_c))
    return sum_c, target_c


def _softmax_grad(logits_cVl, lse_c, idx_c, mine_c, g_dtype):
    """softmax - onehot in g_dtype, elementwise from the logits (one read, one write): the onehot is a
    comparison with the column index, not a scatter, so the whole gradient is one pointwise kernel."""
    p_cVl = torch.exp(logits_cVl.float() - lse_c[:, None])
    hit_cVl = torch.arange(logits_cVl.shape[1], device=logits_cVl.device)[None, :] == idx_c[:, None]
    if mine_c is not None:
        hit_cVl = hit_cVl & mine_c[:, None]
    return torch.where(hit_cVl, p_cVl - 1.0, p_cVl).to(g_dtype)


def _chunk_fused(fns, h_cD, w_VlD, idx_c, mine_c, reduce: VocabReduce | None, need_grad: bool):
    """The same chunk as _chunk_eager from three reads and one write of the logits in their own dtype (a row
    max, then `fns` = (_softmax_stats, _softmax_grad), each one kernel when compiled): no fp32 copy of the
    chunk is ever written. The body for bandwidth-bound GPUs."""
    stats, grad = fns
    logits_cVl = F.linear(h_cD, w_VlD)
    max_c = logits_cVl.amax(dim=-1).float()
    if reduce is not None:
        reduce.max_(max_c)
    sum_c, target_c = stats(logits_cVl, max_c, idx_c, mine_c)
    if reduce is not None:
        both_2c = torch.stack([target_c, sum_c])
        reduce.sum_(both_2c)
        target_c, sum_c = both_2c[0], both_2c[1]
    lse_c = max_c + sum_c.log()
    loss_c = (lse_c - target_c).sum()
    return loss_c, grad(logits_cVl, lse_c, idx_c, mine_c, h_cD.dtype) if need_grad else None


@functools.cache
def _compiled_chunk_fns() -> tuple | None:
    """(_softmax_stats, _softmax_grad) compiled (dynamic shapes: the last chunk and every step's S differ),
    or None where inductor cannot generate GPU kernels (no triton)."""
    from torch.utils._triton import has_triton

    if not has_triton():
        return None
    return torch.compile(_softmax_stats, dynamic=True), torch.compile(_softmax_grad, dynamic=True)


def chunk_fns(device: torch.device) -> tuple | None:
    """The fused chunk functions for `device` (CUDA with triton), or None: the eager body (_chunk_eager)."""
    return _compiled_chunk_fns() if device.type == "cuda" else None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_s CE(h_SD[s] @ w_VlD.T, y_S[s]) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h_SD, w_VlD, y_S, chunk_size: int, need_h: bool, need_w: bool, vocab_start: int,
                reduce: VocabReduce | None):  # type: ignore[override]
        S, Vl = h_SD.shape[0], w_VlD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_SD.device)
        grad_h_SD = torch.empty_like(h_SD) if need_h else None
        # fp32 accumulation across chunks, whatever the weight dtype.
        grad_w_VlD = torch.zeros(w_VlD.shape, dtype=torch.float32, device=w_VlD.device) if need_w else None
        fns = chunk_fns(h_SD.device)
        for s in range(0, S, chunk_size):
            h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
            if reduce is not None:
                local_c = y_c - vocab_start
                mine_c = (local_c >= 0) & (local_c < Vl)
                idx_c = torch.where(mine_c, local_c, torch.zeros_like(local_c))
            else:
                mine_c, idx_c = None, y_c
            if fns is None:
                loss_c, g_cVl = _chunk_eager(h_cD, w_VlD, idx_c, mine_c, reduce, need_h or need_w)
            else:
                loss_c, g_cVl = _chunk_fused(fns, h_cD, w_VlD, idx_c, mine_c, reduce, need_h or need_w)
            loss += loss_c
            if g_cVl is None:
                continue
            if need_h:
                grad_h_SD[s : s + chunk_size] = g_cVl @ w_VlD
            if need_w:
                if grad_w_VlD.dtype == g_cVl.dtype:
                    # out= rather than addmm_: same kernel, and FLOP counters see it (they skip in-place ops).
                    torch.addmm(grad_w_VlD, g_cVl.t(), h_cD, out=grad_w_VlD)
                else:
                    grad_w_VlD += g_cVl.t() @ h_cD
            del g_cVl
        ctx.w_dtype = w_VlD.dtype
        ctx.grads = (grad_h_SD, grad_w_VlD)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("lm_loss: backward ran twice through the same fused loss head (retain_graph is "
                               "not supported); recompute the loss instead")
        grad_h_SD, grad_w_VlD = ctx.grads
        ctx.grads = None  # scaled in place below; free them with the graph
        gh = grad_h_SD.mul_(grad_loss.to(grad_h_SD.dtype)) if grad_h_SD is not None else None
        gw = grad_w_VlD.mul_(grad_loss).to(ctx.w_dtype) if grad_w_VlD is not None else None
        return gh, gw, None, None, None, None, None, None


def check_label_range(y_S: torch.Tensor, vocab_size: int) -> None:
    """A one-line ValueError when a supervised label is outside [0, vocab_size)."""
    if not y_S.numel():
        return
    lo, hi = torch.stack([y_S.min(), y_S.max()]).tolist()  # one read for both bounds
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"labels hold token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size}) "
                         f"(only {IGNORE_INDEX} marks unsupervised positions)")


def supervised_positions(labels_T: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The positions with a label (host tensors in, host tensor out), checked against the vocabulary: what
    lm_loss's supervised_idx takes, built before the labels go to the device."""
    labels = labels_T.reshape(-1)
    sel_S = torch.nonzero(labels != IGNORE_INDEX).flatten()
    check_label_range(labels[sel_S], vocab_size)
    return sel_S


def lm_loss(
    h_TD: torch.Tensor,
    w_VlD: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    vocab_reduce: VocabReduce | None = None,
    supervised_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over supervised positions (fp32 scalar), and their count (int64 scalar).

    h_TD: final (normed) hidden states (T, D) or (..., D), the whole sequence; w_VlD: the head weight (V, D), or
    this rank's rows [vocab_start, vocab_start + Vl) of a vocab-parallel head together with `vocab_reduce` and
    the full `vocab_size`; labels_T: shifted labels (T,), IGNORE_INDEX = unsupervised; supervised_idx: the
    supervised positions (S,) int64 on h's device, found and range-checked on the host (supervised_positions)
    before the labels moved: then nothing is read back from the device here.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    labels = labels_T.reshape(-1)
    h_TD = h_TD.reshape(-1, h_TD.shape[-1])
    if labels.numel() != h_TD.shape[0]:
        raise ValueError(f"labels have {labels.numel()} positions but hidden states {h_TD.shape[0]}")
    checked = supervised_idx is not None
    sel_S = supervised_idx if checked else torch.nonzero(labels != IGNORE_INDEX).flatten()
    # A fill, not torch.tensor(): no copy from pageable host memory.
    n = torch.full((), sel_S.numel(), device=h_TD.device, dtype=torch.long)
    if sel_S.numel() == 0:
        # Keep the graph connected (zero gradient) so every rank runs the same backward.
        return (h_TD.sum() * 0.0 + w_VlD.sum() * 0.0).float(), n
    h_SD = h_TD.index_select(0, sel_S)
    y_S = labels.index_select(0, sel_S)
    V = vocab_size if vocab_size is not None else w_VlD.shape[0]
    if not checked:
        check_label_range(y_S, V)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h_SD.requires_grad, grad_on and w_VlD.requires_grad
    dev = h_SD.device.type
    if torch.is_autocast_enabled(dev):
        # Do what autocast would do for the head's matmul, outside the Function (whose forward runs with
        # autocast off): the casts' backward returns the gradients in the parameters' own dtypes.
        dt = torch.get_autocast_dtype(dev)
        h_SD, w_VlD = h_SD.to(dt), w_VlD.to(dt)
    elif h_SD.dtype != w_VlD.dtype:
        h_SD = h_SD.to(w_VlD.dtype)
    with torch.autocast(dev, enabled=False):
        loss = _FusedLinearCrossEntropy.apply(h_SD, w_VlD, y_S, chunk_size, need_h, need_w, vocab_start,
                                              vocab_reduce)
    return loss, n


def model_loss(model: torch.nn.Module, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, n_supervised) of a whole single-device model on one packed batch: the model's hidden states
    through lm_loss with its own head weight (tests, evaluation, benchmarks)."""
    return lm_loss(model(**inputs), model.lm_head.weight, labels)
