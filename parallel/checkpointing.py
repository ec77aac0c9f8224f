"""Activation checkpointing of ViT blocks and decoder layers: full, per block (every n-th), or per op class.

The blocks are what the model lists in `transformer_blocks()` (model/vlm.py), for every family. Non-reentrant
`torch.utils.checkpoint` through each block's explicit `recompute` slot (model/vision.py VisionBlock, model/text.py
DecoderLayer): the block runs its body as recompute(body, *args). Only the body is
recomputed, never the module call, so module names (FQNs) are unchanged and the hooks of TP (input
redistribution) and FSDP2 (unshard, mixed-precision input casts) run exactly once per call, outside the region.
NOTE: both library alternatives fall short here. checkpoint_wrapper adds `_checkpoint_wrapped_module.` to every
name. The composable `torch.distributed._composable.checkpoint` recomputes by calling the module again, which
replays FSDP's pre-forward hook inside backward: under bf16 its input cast is an op the forward never recorded in
the region, and per-op selective checkpointing then fails ("... encountered during backward but not found in
storage"; tests/parallel/test_engine.py reproduces it). Applied after TP and before FSDP (torchtitan's order).

Per op class ("selective", ac_selective='op'): inside every block, the outputs of matmuls, attention kernels
and TP collectives are saved; norms, activations, rotary and other elementwise ops are recomputed. This keeps
most of the memory win of full recomputation for a fraction of its extra FLOPs (Korthikanti et al. 2022).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.config import ParallelConfig


def _op_names() -> set:
    """Ops whose outputs selective checkpointing saves (looked up by name: some only exist on some builds)."""
    aten = torch.ops.aten
    names = [
        (aten, "mm"), (aten, "addmm"), (aten, "bmm"), (aten, "baddbmm"), (aten, "linear"),
        (aten, "_scaled_dot_product_flash_attention"), (aten, "_scaled_dot_product_efficient_attention"),
        (aten, "_scaled_dot_product_cudnn_attention"), (aten, "_scaled_dot_product_flash_attention_for_cpu"),
        (aten, "_flash_attention_forward"), (aten, "_efficient_attention_forward"),
        (aten, "convolution"),
    ]
    out = set()
    for ns, name in names:
        op = getattr(ns, name, None)
        if op is not None:
            out.add(op.default)
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
        op = getattr(torch.ops._c10d_functional, name, None)
        if op is not None:
            out.add(op.default)
    return out


_SAVE_OPS: set | None = None


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    global _SAVE_OPS
    if _SAVE_OPS is None:
        _SAVE_OPS = _op_names()
    return create_selective_checkpoint_contexts(_policy)


def checkpoint_module(module: nn.Module, selective_ops: bool) -> None:
    """Recompute the block's body in backward (all of it, or all but the saved op outputs)."""
    if not hasattr(module, "recompute"):
        raise TypeError(f"{type(module).__name__} has no `recompute` slot for activation checkpointing")
    kwargs = {"context_fn": _selective_context} if selective_ops else {}
    module.recompute = partial(checkpoint, use_reentrant=False, preserve_rng_state=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> list[str]:
    """Apply cfg.activation_checkpoint to every ViT block and decoder layer; returns the FQNs checkpointed."""
    mode = cfg.activation_checkpoint
    if mode == "none":
        return []
    # 'block' mode counts every n-th block within each tower (ViT, decoder) separately.
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in model.transformer_blocks():
        groups.setdefault(name.rsplit(".", 1)[0], []).append((name, block))
    done = []
    for blocks in groups.values():
        for i, (name, block) in enumerate(blocks):
            if mode == "full":
                checkpoint_module(block, selective_ops=False)
            elif cfg.ac_selective == "op":
                checkpoint_module(block, selective_ops=True)
            elif i % cfg.ac_every == 0:  # 'block': every ac_every-th block of the ViT and of the LLM
                checkpoint_module(block, selective_ops=False)
            else:
                continue
            done.append(name)
    return done
