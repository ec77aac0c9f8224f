"""The parallel engine: DP with ZeRO-1 (FSDP2), TP + sequence parallelism (DTensor), 1F1B pipeline with a per-step
broadcast of dynamic lengths, selective activation checkpointing. Proven equal to one process (tests/parallel).

Usage (the trainer's view)::

    from parallel import ParallelConfig, init_distributed, parallelize

    cfg = ParallelConfig(tp=2, pp=2, num_microbatches=4, mixed_precision="bf16")
    dims = init_distributed(cfg)                     # torchrun / deepspeed / mpirun / srun / plain python
    model = VLModel(model_cfg)                       # any family; same weights on every rank (seed or checkpoint)
    for n, p in model.named_parameters():            # freezing happens BEFORE parallelize
        p.requires_grad_(get_family(model_cfg.family).group_of(n) != "vision")
    pm = parallelize(model, dims, cfg)               # pm.materialize() + load_state_dict() after a meta build
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    for step in range(n):
        res = pm.step(microbatches if dims.is_first_stage else None)   # list[PackedBatch] of this dp rank
        norm = pm.clip_grad_norm_(1.0)
        opt.step(); opt.zero_grad()
        print(res.loss, res.num_tokens, res.num_supervised)
    ev = pm.evaluate(eval_microbatches if dims.is_first_stage else None)   # forward only: ev.loss, ev.loss_sum

Order applied by parallelize: pipeline split -> TP/SP -> activation checkpointing -> compile -> FSDP2
(docs/parallel.md).
"""

from __future__ import annotations

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, destroy_distributed, init_distributed
from parallel.engine import EvalResult, ParallelModel, StepResult, parallelize
from parallel.launcher import LaunchEnv, resolve_launch_env
from parallel.pipeline_schedule import ScheduleStats
from parallel.pipeline_split import auto_first_stage_layers, stage_layer_ids

__all__ = [
    "EvalResult",
    "LaunchEnv",
    "ParallelConfig",
    "ParallelDims",
    "ParallelModel",
    "ScheduleStats",
    "StepResult",
    "auto_first_stage_layers",
    "destroy_distributed",
    "init_distributed",
    "parallelize",
    "resolve_launch_env",
    "stage_layer_ids",
]
