"""Vocab-parallel LM head + cross-entropy over supervised positions only, in chunks; never T x V logits.

Shape legend: T = packed tokens, D = width, V = vocab, Vl = V / tp (this rank's vocab rows), S = supervised
tokens, c = rows of one chunk.

Each tp rank holds Vl rows of the head weight (Shard(0)). For a chunk of supervised hidden states h_cD (whole,
identical on every tp rank) it computes logits_cVl = h_cD @ w_VlD^T and the exact cross-entropy with three
small all-reduces over tp (max, sum of exp, target logit), as Megatron's vocab-parallel cross-entropy. The
gradient w.r.t. h_cD is this rank's partial sum over its vocab rows; the caller sums it over tp (a Partial
placement), see `gather_for_head`. Each chunk is checkpointed: its logits are recomputed in backward.

The result equals model.loss.lm_loss on the unsharded weight (tested): (sum of token CE, supervised count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

IGNORE_INDEX = -100


class _FusedVocabParallelCE(torch.autograd.Function):
    """sum_s CE over the vocab split across `group`, gradients computed chunk by chunk in forward.

    Per chunk: logits_cVl = h_cD @ w_VlD^T (fp32), all-reduce MAX of the row maxima, all-reduce SUM of
    (target logit, sum of exp) -- then this rank's slice of softmax - onehot is final, so d/dh (this rank's
    partial sum over its vocab rows) and d/dW (its rows) are contracted right away and the chunk's logits are
    freed: one chunk of c x Vl logits at a time, no recomputation in backward (3 matmuls in all, like
    model/loss.py's fused head). Backward scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, h_SD, w_VlD, y_S, vocab_start: int, group, chunk_size: int, need_h: bool, need_w: bool):
        S, Vl = h_SD.shape[0], w_VlD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_SD.device)
        grad_h_SD = torch.empty_like(h_SD) if need_h else None
        grad_w_VlD = torch.zeros(w_VlD.shape, dtype=torch.float32, device=w_VlD.device) if need_w else None
        for s in range(0, S, chunk_size):
            h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
            logits_cVl = F.linear(h_cD, w_VlD).float()
            max_c = logits_cVl.amax(dim=-1)
            dist.all_reduce(max_c, op=dist.ReduceOp.MAX, group=group)
            local_c = y_c - vocab_start
            mine_c = (local_c >= 0) & (local_c < Vl)
            idx_c = torch.where(mine_c, local_c, torch.zeros_like(local_c))
            rows_c = torch.arange(y_c.numel(), device=y_c.device)
            p_cVl = logits_cVl.sub_(max_c[:, None])  # in place: logits - max, then exp, then the softmax
            target_c = torch.where(mine_c, p_cVl[rows_c, idx_c], torch.zeros_like(max_c))
            p_cVl = p_cVl.exp_()
            both_2c = torch.stack([target_c, p_cVl.sum(dim=-1)])
            dist.all_reduce(both_2c, op=dist.ReduceOp.SUM, group=group)
            target_c, sum_c = both_2c[0], both_2c[1]
            loss += (sum_c.log() - target_c).sum()
            if not (need_h or need_w):
                continue
            g_cVl = p_cVl.div_(sum_c[:, None])
            g_cVl[rows_c, idx_c] -= mine_c.to(g_cVl.dtype)
            g_cVl = g_cVl.to(h_SD.dtype)
            if need_h:
                grad_h_SD[s : s + chunk_size] = g_cVl @ w_VlD
            if need_w:
                grad_w_VlD += (g_cVl.t() @ h_cD).float()
            del g_cVl, p_cVl, logits_cVl
        ctx.w_dtype = w_VlD.dtype
        ctx.grads = (grad_h_SD, grad_w_VlD)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("vocab-parallel loss: backward ran twice through the same head (retain_graph is "
                               "not supported); recompute the loss instead")
        grad_h_SD, grad_w_VlD = ctx.grads
        ctx.grads = None
        gh = grad_h_SD.mul_(grad_loss.to(grad_h_SD.dtype)) if grad_h_SD is not None else None
        gw = grad_w_VlD.mul_(grad_loss).to(ctx.w_dtype) if grad_w_VlD is not None else None
        return gh, gw, None, None, None, None, None, None


def vocab_parallel_lm_loss(
    h_TD: torch.Tensor,
    w_VlD: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of supervised-token cross-entropies, supervised count) with this rank's vocab rows w_VlD.

    h_TD must be the whole sequence, identical on every rank of `group` (see gather_for_head)."""
    sel_S = torch.nonzero(labels_T.reshape(-1) != IGNORE_INDEX).flatten()
    n = torch.tensor(sel_S.numel(), device=h_TD.device, dtype=torch.long)
    h_TD = h_TD.reshape(-1, h_TD.shape[-1])
    if sel_S.numel() == 0:
        # Keep the graph connected (zero gradient) so every rank runs the same backward.
        return (h_TD.sum() * 0.0 + w_VlD.sum() * 0.0).float(), n
    h_SD = h_TD.index_select(0, sel_S)
    y_S = labels_T.reshape(-1).index_select(0, sel_S)
    if h_SD.dtype != w_VlD.dtype:
        h_SD = h_SD.to(w_VlD.dtype)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h_SD.requires_grad, grad_on and w_VlD.requires_grad
    return _FusedVocabParallelCE.apply(h_SD, w_VlD, y_S, vocab_start, group, chunk_size, need_h, need_w), n


def gather_for_head(h: torch.Tensor, tp_mesh: DeviceMesh, sequence_parallel: bool) -> torch.Tensor:
    """The whole final hidden states on every tp rank, as a plain tensor whose gradient is summed over tp.

    SP: all-gather the sequence shards (backward: reduce-scatter of the per-rank partial gradients).
    No SP: the hidden states are already whole (backward: all-reduce of the partial gradients)."""
    if not isinstance(h, DTensor):
        h = DTensor.from_local(h, tp_mesh, [Shard(0) if sequence_parallel else Replicate()], run_check=False)
    if h.placements[0] != Replicate():
        h = h.redistribute(tp_mesh, [Replicate()])
    return h.to_local(grad_placements=[Partial()])


def make_loss_fn(tp_mesh: DeviceMesh, sequence_parallel: bool, chunk_size: int):
    """loss_fn(h, head_weight, labels) -> (loss_sum, n) for a head weight that is a Shard(0) DTensor over tp."""
    group = tp_mesh.get_group()

    def loss_fn(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
        if not isinstance(w, DTensor) or w.placements[-1] != Shard(0):
            raise ValueError(f"the vocab-parallel head expects a Shard(0) DTensor weight, got {type(w).__name__}")
        w_VlD = w.to_local()
        V = w.shape[0]
        vocab_start = tp_mesh.get_local_rank() * (V // tp_mesh.size())
        h_TD = gather_for_head(h, tp_mesh, sequence_parallel)
        return vocab_parallel_lm_loss(h_TD, w_VlD, labels, vocab_start=vocab_start, group=group, chunk_size=chunk_size)

    return loss_fn
