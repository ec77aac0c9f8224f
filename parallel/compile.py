"""torch.compile per ViT block and per decoder layer, for packed lengths that change every step.

Applied by parallelize() after activation checkpointing and tensor parallelism and before FSDP (torchtitan's
order): `Module.compile()` compiles the block's call in place, so parameter names (FQNs), checkpoints and the
FSDP2 units that wrap the block afterwards are unchanged; FSDP2's own hooks stay outside the graphs (dynamo
skips them).

Why per block and `dynamic=True`: every block of one kind runs the same code, so dynamo traces it once and
reuses the graph for the other blocks (their parameters are graph inputs). Packed microbatches have a new
length every step (T tokens, N patches, S segments): compiled with static shapes, each new length would
recompile until dynamo's recompile limit and then fall back to eager. Compiled dynamic from the start, the
lengths are symbols, and the graphs specialize only on what changes the traced code (one segment or several,
whether a microbatch has vision input), a handful of compiles in all (tests/parallel/test_compile.py counts
them over 20 different packed lengths). The attention backends are written to trace without host syncs
(model/attention.py: SDPA takes its mask form inside a compiled region).

The top-level forwards (embedding scatter, ViT position ids, loss head) stay eager: they are cheap, and the
ViT's position ids are computed from grid_thw on the host.
"""

from __future__ import annotations

import torch.nn as nn

from parallel.config import ParallelConfig


def apply_compile(model: nn.Module, cfg: ParallelConfig) -> list[str]:
    """With cfg.compile: compile every ViT block and decoder layer in place; returns the FQNs compiled."""
    if not cfg.compile:
        return []
    done = []
    for name, block in model.transformer_blocks():
        # fullgraph=False: FSDP2's hooks on the block (added after this) run eagerly between graphs.
        block.compile(backend=cfg.compile_backend, dynamic=True)
        done.append(name)
    return done
