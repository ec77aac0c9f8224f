"""Freezing, AdamW parameter groups and the LR schedule.

Parameter groups (vision, merger, llm) are the model family's (model/family.py `ModelFamily.group_of`, by the
FQNs of the single-process model, which the engine keeps under every layout): every parameter in exactly one.

Frozen parameters get `requires_grad=False` before the engine wraps the model, so they get no gradient, no
optimizer state and no gradient reduction. Trainable parameters form up to six AdamW groups:
(vision | merger | llm) x (decay | no decay); norms, biases and every 1-d parameter get no weight decay.

The LR is a pure function of the step (warmup, then cosine/linear/constant decay to min_lr_ratio x peak at
train.steps), so a resumed run sets exactly the LR the uninterrupted run would have, with no scheduler
state to drift. Optimizer state is created by AdamW's first step (or, on resume, by
torch.distributed.checkpoint.state_dict before the saved state is loaded into it: train/state.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from model.family import ModelFamily
from train.config import GROUPS, JobConfig


def decays(fqn: str, p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings only: never to norms, biases or other 1-d tensors."""
    owner = fqn.rsplit(".", 2)[-2] if fqn.count(".") >= 1 else ""
    return p.ndim >= 2 and not fqn.endswith(".bias") and "norm" not in owner


def apply_freeze(named_params: Iterable[tuple[str, nn.Parameter]], frozen: Iterable[str],
                 family: ModelFamily) -> dict[str, int]:
    """Set requires_grad by the family's groups; return {group: trainable parameter count} (after freezing)."""
    frozen = set(frozen)
    unknown = frozen - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}; groups are {list(GROUPS)}")
    counts = dict.fromkeys(GROUPS, 0)
    for fqn, p in named_params:
        g = family.group_of(fqn)
        p.requires_grad_(g not in frozen)
        if g not in frozen:
            counts[g] += p.numel()
    return counts


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], cfg: JobConfig,
                 family: ModelFamily) -> list[dict]:
    """AdamW groups for the trainable parameters: one per (group, decay) that has parameters."""
    buckets: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for fqn, p in named_params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        buckets.setdefault((family.group_of(fqn), decays(fqn, p)), []).append((fqn, p))
    groups = []
    for (g, decay), items in sorted(buckets.items()):
        peak = cfg.group_lr(g)
        groups.append(
            {
                "params": [p for _, p in items],
                "name": f"{g}{'' if decay else '_no_decay'}",
                "group": g,
                "peak_lr": peak,
                "lr": peak,
                "weight_decay": cfg.optim.weight_decay if decay else 0.0,
            }
        )
    return groups


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW that steps DTensor parameters on their local tensors.

    FSDP2 makes every parameter a DTensor, even on a 1-rank dp mesh; AdamW's foreach / fused ops over hundreds
    of them then each go through DTensor's dispatch (sharding propagation per op) to end up running the same
    kernel on the local tensors. AdamW is elementwise, so when a parameter, its gradient and its state share one
    layout (mesh and placements: what FSDP2 gives them), the update of the local tensors is the update: the
    lists AdamW gathers are swapped for their local tensors (views of the same storage, updated in place) before
    its math runs. The state itself stays the DTensors AdamW creates, so the optimizer's state_dict and
    checkpoints (torch.distributed.checkpoint) are unchanged. A group where some layout differs (e.g. a Partial
    gradient, which DTensor would reduce first) keeps the DTensor path."""

    def _init_group(self, group, params, grads, *state_lists):  # type: ignore[override]
        has_complex = super()._init_group(group, params, grads, *state_lists)
        # The per-parameter lists AdamW fills (exp_avg, exp_avg_sq, [max_exp_avg_sq], step) are index-aligned
        # with params; the step counters are plain tensors.
        lists = [params, grads, *(lst for lst in state_lists if len(lst) == len(params))]
        if params and all(_same_layout(p, [lst[i] for lst in lists[1:]]) for i, p in enumerate(params)):
            for lst in lists:
                lst[:] = [t.to_local() if isinstance(t, DTensor) else t for t in lst]
        return has_complex


def _same_layout(p: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Whether the tensors AdamW uses for parameter p step on their local tensors together with p's: for a
    DTensor p, DTensors of its mesh and placements (or 0-d step counters, plain tensors); for a plain p, plain."""
    if not isinstance(p, DTensor):
        return not any(isinstance(t, DTensor) for t in others)
    return all((isinstance(t, DTensor) and t.device_mesh == p.device_mesh and t.placements == p.placements)
               or (not isinstance(t, DTensor) and t.dim() == 0) for t in others)


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: JobConfig,
                    family: ModelFamily) -> torch.optim.AdamW | None:
    """AdamW over the trainable parameters, fused on CUDA, foreach elsewhere (optim.implementation; torch's fused
    kernel runs on the CPU too), stepping DTensor parameters on their local tensors (ShardLocalAdamW).

    None when this rank holds no trainable parameter (e.g. a pipeline stage of only frozen LLM layers in
    stage 1): the rank still runs forward/backward (activation gradients flow through it) but never steps.
    """
    groups = param_groups(named_params, cfg, family)
    if not groups:
        return None
    impl = cfg.optim.implementation
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    if impl == "auto":
        impl = "fused" if on_cuda else "foreach"
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return ShardLocalAdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, **kw)


def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """The update, unless the device flag `skip` (a 0-dim bool: a non-finite loss or gradient norm) is set. The
    fused AdamW takes the flag into its kernel (found_inf, as torch's GradScaler passes it: no parameter, moment
    or step count changes), so the host never waits for the flag; the other implementations read it first."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bool(skip):
        optimizer.step()


def lr_multiplier(step: int, cfg: JobConfig) -> float:
    """LR / peak LR for the update made at 0-based step `step`."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    if o.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay


def set_lr(optimizer: torch.optim.Optimizer | None, step: int, cfg: JobConfig) -> dict[str, float]:
    """Set every group's LR for `step`; return {trainable module group: lr} (the same on every rank)."""
    mult = lr_multiplier(step, cfg)
    if optimizer is not None:
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * mult
    return {g: cfg.group_lr(g) * mult for g in GROUPS if g not in cfg.frozen_groups}


class ScheduleState(Stateful):
    """The settings that decide every step's update (per-group peak LRs, schedule, warmup, AdamW), saved with each
    checkpoint (`schedule.<key>`) so that a resumed run can say which of them its recipe changed."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.saved: dict[str, Any] = {}
        """The checkpoint's settings, after a load."""

    def state_dict(self) -> dict[str, Any]:
        o = self.cfg.optim
        out: dict[str, Any] = {f"lr_{g}": self.cfg.group_lr(g) for g in GROUPS}
        out.update(schedule=o.schedule, warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                   steps=self.cfg.train.steps, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = dict(state_dict)

    def changes(self) -> list[str]:
        """'key: saved -> now' for every loaded setting the recipe now sets differently."""
        now = self.state_dict()
        return [f"{k}: {self.saved[k]!r} -> {now[k]!r}" for k in now if k in self.saved and self.saved[k] != now[k]]

