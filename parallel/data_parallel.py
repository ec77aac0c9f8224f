"""Data parallelism with ZeRO-1 semantics (or ZeRO-3) through FSDP2 `fully_shard` over the dp mesh.

ZeRO-1 (zero_stage=1): every ViT block, every decoder layer (the model's `transformer_blocks()`) and the stage's
root are FSDP units with
reshard_after_forward=False. The parameters are all-gathered once per step (first forward) and stay unsharded
for all microbatches (`set_reshard_after_backward(False)` until the last one); gradients accumulate unsharded
without communication and are reduce-scattered once, on the last microbatch. What stays sharded over dp is the
optimizer's view: the fp32 master parameters, their gradients after the step's reduction and the optimizer
state (built on the sharded DTensor parameters). That is ZeRO-1's memory for optimizer state, plus sharded
master weights.

ZeRO-3 (zero_stage=3): units reshard after forward and after every backward, and gradients are
reduce-scattered every microbatch (accumulating sharded), so parameters and gradients are sharded too.

NOTE: the loss is sum(token CE) / GLOBAL supervised-token count (all dp ranks and microbatches), so the true
gradient is the SUM of the per-rank gradients: FSDP's own averaging over dp is turned off (divide factor 1,
sum reduction); nothing divides twice.

Mixed precision 'bf16': MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 compute, fp32 master
weights (the sharded parameters the optimizer sees) and fp32 gradient reduction.

Frozen parameters (requires_grad=False before parallelize) are all-gathered for compute but get no gradient,
no reduction and, as the optimizer skips parameters without gradients, no optimizer state.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from parallel.config import ParallelConfig


def mp_policy(cfg: ParallelConfig) -> MixedPrecisionPolicy:
    if cfg.mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, cfg: ParallelConfig) -> list[FSDPModule]:
    """fully_shard every ViT block, every decoder layer, then the stage root. Returns all FSDP units."""
    reshard = cfg.zero_stage == 3
    kw = {"mesh": dp_mesh, "mp_policy": mp_policy(cfg), "reshard_after_forward": reshard}
    units: list[FSDPModule] = [fully_shard(block, **kw) for _, block in model.transformer_blocks()]
    # The root (embeddings, patch embed, mergers, final norm, head) is needed first in backward: keep it
    # unsharded after forward in both modes.
    units.append(fully_shard(model, **{**kw, "reshard_after_forward": False}))
    for unit in units:
        # (set_reduce_scatter_divide_factor: the name before torch 2.8)
        (unit.set_gradient_divide_factor if hasattr(unit, "set_gradient_divide_factor")
         else unit.set_reduce_scatter_divide_factor)(1.0)
        # gloo has no PREMUL_SUM/AVG; a plain SUM is also what a divide factor of 1 means.
        if hasattr(unit, "set_force_sum_reduction_for_comms"):
            unit.set_force_sum_reduction_for_comms(True)
    return units


def set_microbatch_flags(root: FSDPModule, *, last: bool, zero_stage: int) -> None:
    """Before each microbatch's backward: reduce gradients (and reshard) only on the last one (ZeRO-1)."""
    root.set_is_last_backward(last)
    if zero_stage == 1:
        root.set_requires_gradient_sync(last)
        root.set_reshard_after_backward(last)
    else:
        root.set_requires_gradient_sync(True)
        root.set_reshard_after_backward(True)
