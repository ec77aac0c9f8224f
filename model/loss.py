"""Language-model loss head that never materializes the full [tokens x vocab] logits.

Shape legend: T = packed tokens, D = width, V = vocab, S = supervised tokens, c = chunk rows.

`labels_T` are already shifted: labels_T[t] is the token predicted at position t, -100 where nothing is
supervised (vision tokens, prompts, the last token of each packed sample). Only the S supervised rows go
through the head, in chunks of `chunk_size` rows.

The head is one fused autograd Function (the approach of Liger-Kernel's fused linear cross-entropy): while
computing a chunk's logits in forward, it also turns them into d(loss)/d(logits) = softmax - onehot and
immediately contracts that with the weight and the hidden states into the chunk's d/dh and the running
d/dW (fp32 accumulator). The chunk's logits are then freed, so peak memory is ONE chunk of logits (c x V,
fp32) however long the sequence, and no logits are recomputed in backward: the head costs exactly the 3
matmuls of forward + backward (1 when no gradient is needed, 2 when the weight is frozen). Backward only
scales the stored gradients by the incoming grad (e.g. 1 / global token count).

NOTE: d/dW and d/dh are computed during forward whenever autograd records the call. Under torch.no_grad()
(evaluation) only the loss is computed. A DTensor weight (vocab-parallel head under TP) takes the generic
path instead: per-chunk F.linear + cross_entropy under activation checkpointing (logits recomputed in
backward), which DTensor's loss_parallel supports.

Returns (loss_sum fp32, n_supervised int64): the trainer divides by the GLOBAL supervised-token count
(dp x microbatches), not by a per-microbatch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024
"""Rows per chunk: 1024 x 151936 fp32 logits = 0.62 GB transient, large enough for full-speed matmuls."""


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_s CE(h_SD[s] @ w_VD.T, y_S[s]) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h_SD, w_VD, y_S, chunk_size: int, need_h: bool, need_w: bool):  # type: ignore[override]
        S = h_SD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_SD.device)
        grad_h_SD = torch.empty_like(h_SD) if need_h else None
        # fp32 accumulation across chunks, whatever the weight dtype.
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        for s in range(0, S, chunk_size):
            h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
            logits_cV = F.linear(h_cD, w_VD).float()
            target_c = logits_cV.gather(1, y_c[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: the buffer becomes exp(logits - max), then the softmax, then
            # the gradient, with no second c x V allocation (torch.logsumexp would make one).
            max_c1 = logits_cV.amax(dim=-1, keepdim=True)
            p_cV = logits_cV.sub_(max_c1).exp_()
            sum_c1 = p_cV.sum(dim=-1, keepdim=True)
            loss += (max_c1.squeeze(1) + sum_c1.log().squeeze(1) - target_c).sum()
            if not (need_h or need_w):
                continue
            # d(loss)/d(logits) = softmax - onehot
            g_cV = p_cV.div_(sum_c1)
            g_cV[torch.arange(y_c.numel(), device=y_c.device), y_c] -= 1.0
            g_cV = g_cV.to(h_SD.dtype)
            if need_h:
                grad_h_SD[s : s + chunk_size] = g_cV @ w_VD
            if need_w:
                if grad_w_VD.dtype == g_cV.dtype:
                    # out= rather than addmm_: same kernel, and FLOP counters see it (they skip in-place ops).
                    torch.addmm(grad_w_VD, g_cV.t(), h_cD, out=grad_w_VD)
                else:
                    grad_w_VD += g_cV.t() @ h_cD
            del g_cV, p_cV, logits_cV
        ctx.w_dtype = w_VD.dtype
        ctx.grads = (grad_h_SD, grad_w_VD)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("lm_loss: backward ran twice through the same fused loss head (retain_graph is "
                               "not supported); recompute the loss instead")
        grad_h_SD, grad_w_VD = ctx.grads
        ctx.grads = None  # scaled in place below; free them with the graph
        gh = grad_h_SD.mul_(grad_loss.to(grad_h_SD.dtype)) if grad_h_SD is not None else None
        gw = grad_w_VD.mul_(grad_loss).to(ctx.w_dtype) if grad_w_VD is not None else None
        return gh, gw, None, None, None, None


def _chunk_ce(h_cD: torch.Tensor, w_VD: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
    logits_cV = F.linear(h_cD, w_VD).float()
    return F.cross_entropy(logits_cV, y_c, reduction="sum")


def _checkpointed_chunks(h_SD, w_VD, y_S, chunk_size: int) -> torch.Tensor:
    total = h_SD.new_zeros((), dtype=torch.float32)
    for s in range(0, h_SD.shape[0], chunk_size):
        h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
        if torch.is_grad_enabled() and (h_cD.requires_grad or w_VD.requires_grad):
            total = total + checkpoint(_chunk_ce, h_cD, w_VD, y_c, use_reentrant=False)
        else:
            total = total + _chunk_ce(h_cD, w_VD, y_c)
    return total


def lm_loss(
    h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over supervised positions (fp32 scalar), and their count (int64 scalar).

    h_TD: final (normed) hidden states (T, D) or (..., D); w_VD: the head weight (V, D); labels_T: shifted
    labels (T,), -100 = unsupervised.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    labels = labels_T.reshape(-1)
    h_TD = h_TD.reshape(-1, h_TD.shape[-1])
    if labels.numel() != h_TD.shape[0]:
        raise ValueError(f"labels have {labels.numel()} positions but hidden states {h_TD.shape[0]}")
    sel_S = torch.nonzero(labels != IGNORE_INDEX).flatten()
    n = torch.tensor(sel_S.numel(), device=h_TD.device, dtype=torch.long)
    if sel_S.numel() == 0:
        # Keep the graph connected (zero gradient) so every rank runs the same backward.
        return (h_TD.sum() * 0.0 + w_VD.sum() * 0.0).float(), n
    h_SD = h_TD.index_select(0, sel_S)
    y_S = labels.index_select(0, sel_S)
    V = w_VD.shape[0]
    lo, hi = torch.stack([y_S.min(), y_S.max()]).tolist()  # one host sync (nonzero above already syncs)
    if lo < 0 or hi >= V:
        raise ValueError(f"labels hold token id {lo if lo < 0 else hi} outside the vocabulary [0, {V}) "
                         f"(only {IGNORE_INDEX} marks unsupervised positions)")
    if _is_dtensor(w_VD) or _is_dtensor(h_SD):
        return _checkpointed_chunks(h_SD, w_VD, y_S, chunk_size), n
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h_SD.requires_grad, grad_on and w_VD.requires_grad
    dev = h_SD.device.type
    if torch.is_autocast_enabled(dev):
        # Do what autocast would do for the head's matmul, outside the Function (whose forward runs with
        # autocast off): the casts' backward returns the gradients in the parameters' own dtypes.
        dt = torch.get_autocast_dtype(dev)
        h_SD, w_VD = h_SD.to(dt), w_VD.to(dt)
    elif h_SD.dtype != w_VD.dtype:
        h_SD = h_SD.to(w_VD.dtype)
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCrossEntropy.apply(h_SD, w_VD, y_S, chunk_size, need_h, need_w), n


def naive_lm_loss(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference head: full logits for every position. For tests only."""
    logits_TV = F.linear(h_TD.reshape(-1, h_TD.shape[-1]), w_VD).float()
    y_T = labels_T.reshape(-1)
    return F.cross_entropy(logits_TV, y_T, ignore_index=IGNORE_INDEX, reduction="sum"), (y_T != IGNORE_INDEX).sum()
