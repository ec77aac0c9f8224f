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
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _VocabParallelCE(torch.autograd.Function):
    """Per-row cross-entropy of logits split over the vocab across `group`; returns loss_c (c,)."""

    @staticmethod
    def forward(ctx, logits_cVl: torch.Tensor, target_c: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        logits_cVl = logits_cVl.float()
        max_c = logits_cVl.max(dim=-1).values
        dist.all_reduce(max_c, op=dist.ReduceOp.MAX, group=group)
        shifted_cVl = logits_cVl - max_c[:, None]
        Vl = logits_cVl.shape[-1]
        local_c = target_c - vocab_start
        mine_c = (local_c >= 0) & (local_c < Vl)
        idx_c = torch.where(mine_c, local_c, torch.zeros_like(local_c))
        rows = torch.arange(target_c.shape[0], device=target_c.device)
        target_logit_c = torch.where(mine_c, shifted_cVl[rows, idx_c], torch.zeros_like(max_c))
        exp_cVl = shifted_cVl.exp()
        sum_exp_c = exp_cVl.sum(dim=-1)
        # One all-reduce for both sums (they are independent).
        both_2c = torch.stack([target_logit_c, sum_exp_c])
        dist.all_reduce(both_2c, op=dist.ReduceOp.SUM, group=group)
        target_logit_c, sum_exp_c = both_2c[0], both_2c[1]
        loss_c = sum_exp_c.log() - target_logit_c
        ctx.save_for_backward(exp_cVl.div_(sum_exp_c[:, None]), idx_c, mine_c)
        return loss_c

    @staticmethod
    def backward(ctx, grad_c: torch.Tensor):
        softmax_cVl, idx_c, mine_c = ctx.saved_tensors
        grad_cVl = softmax_cVl.clone()
        rows = torch.arange(grad_cVl.shape[0], device=grad_cVl.device)
        grad_cVl[rows, idx_c] -= mine_c.to(grad_cVl.dtype)
        return grad_cVl * grad_c[:, None], None, None, None


def _chunk_loss(h_cD: torch.Tensor, w_VlD: torch.Tensor, y_c: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    logits_cVl = F.linear(h_cD, w_VlD)
    return _VocabParallelCE.apply(logits_cVl, y_c, vocab_start, group).sum()


def vocab_parallel_lm_loss(
    h_TD: torch.Tensor,
    w_VlD: torch.Tensor,
    labels_T: torch.Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup,
    chunk_size: int = 4096,
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
    total = h_SD.new_zeros((), dtype=torch.float32)
    for s in range(0, sel_S.numel(), chunk_size):
        h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
        if torch.is_grad_enabled() and (h_cD.requires_grad or w_VlD.requires_grad):
            # Every tp rank recomputes the same chunks in the same order, so the collectives inside match.
            total = total + checkpoint(_chunk_loss, h_cD, w_VlD, y_c, vocab_start, group, use_reentrant=False)
        else:
            total = total + _chunk_loss(h_cD, w_VlD, y_c, vocab_start, group)
    return total, n


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
