"""The vocab-parallel LM head + cross-entropy: model/loss.py's fused kernel over this rank's vocabulary rows.

Shape legend: T = packed tokens, D = width, V = vocab, Vl = V / tp (this rank's vocab rows).

Each tp rank holds Vl rows of the head weight (Shard(0)). The whole final hidden states are gathered on every
tp rank (`gather_for_head`), the kernel computes this rank's logits chunk by chunk and the exact cross-entropy
with two small all-reduces per chunk over tp (`_TPReduce`), as Megatron's vocab-parallel cross-entropy. The
gradient w.r.t. the hidden states is this rank's partial sum over its rows; `gather_for_head` marks it Partial,
so autograd sums it over tp (a reduce-scatter under SP, an all-reduce without).

The result equals model.loss.lm_loss on the unsharded weight (tested): (sum of token CE, supervised count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from model.loss import lm_loss


class _TPReduce:
    """model.loss.VocabReduce over one tp process group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def max_(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)

    def sum_(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)


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
    """loss_fn(h, head_weight, labels, supervised_idx=None) -> (loss_sum, n) for a head weight that is a Shard(0)
    DTensor over tp."""
    reduce = _TPReduce(tp_mesh.get_group())

    def loss_fn(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, supervised_idx: torch.Tensor | None = None):
        if not isinstance(w, DTensor) or w.placements[-1] != Shard(0):
            raise ValueError(f"the vocab-parallel head expects a Shard(0) DTensor weight, got {type(w).__name__}")
        w_VlD = w.to_local()
        V = w.shape[0]
        vocab_start = tp_mesh.get_local_rank() * (V // tp_mesh.size())
        h_TD = gather_for_head(h, tp_mesh, sequence_parallel)
        return lm_loss(h_TD, w_VlD, labels, chunk_size=chunk_size, vocab_start=vocab_start, vocab_size=V,
                       vocab_reduce=reduce, supervised_idx=supervised_idx)

    return loss_fn
