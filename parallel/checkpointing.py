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
(the op each attention backend actually dispatches: SDPA's kernels, torch's varlen custom op, flash-attn's,
flex_attention's higher-order op) and TP collectives are saved; norms, activations, rotary and other elementwise
ops are recomputed. This keeps most of the memory win of full recomputation for a fraction of its extra FLOPs
(Korthikanti et al. 2022).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.config import ParallelConfig

_ATEN_SAVED = (
    "mm", "addmm", "bmm", "baddbmm", "linear", "convolution",
    # SDPA's kernels (model/attention.py's 'sdpa' backend): CUDA flash / efficient / cuDNN, CPU flash, other devices.
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward", "_efficient_attention_forward",
)
_CUSTOM_SAVED = (
    # The packed kernels the 'torch_varlen' and 'flash' backends call: the dispatcher (and so the policy) sees the
    # custom op, never the aten kernel inside it. torch >= 2.10 (torch.nn.attention.varlen); flash-attn >= 2.6
    # registers its functions through torch.library.
    ("torch_attn", "_varlen_attn"), ("flash_attn", "_flash_attn_varlen_forward"), ("flash_attn", "_flash_attn_forward"),
)
_COLLECTIVES_SAVED = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")


def _op_names() -> set:
    """Ops whose outputs selective checkpointing saves, looked up by name: an op this build (or an optional
    package) does not have is left out, without error."""
    # Importing the backends registers the optional kernels' custom ops (torch's varlen, flash-attn).
    import model.attention  # noqa: F401

    aten = torch.ops.aten
    out: set = {getattr(aten, name).default for name in _ATEN_SAVED if hasattr(aten, name)}
    for ns, name in _CUSTOM_SAVED:
        op = getattr(getattr(torch.ops, ns), name, None)
        if op is not None:
            out.add(op.default)
    for name in _COLLECTIVES_SAVED:
        op = getattr(torch.ops._c10d_functional, name, None)
        if op is not None:
            out.add(op.default)
    # The 'flex' backend: flex_attention is a higher-order operator, and the policy receives the operator itself
    # (its kernel's outputs, not the ops inside it).
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_hop

        out.add(flex_hop)
    except ImportError:
        pass
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
