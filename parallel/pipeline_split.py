"""Pipeline split: which decoder layers each stage holds, and pruning a Qwen2VL down to one stage.

Stage 0 holds the ViT, the merger, the token embedding and the first k decoder layers; the remaining layers
are split evenly over stages 1..p-1 (any remainder goes to the earlier of them, because the last stage also
carries the final norm, the LM head and the loss); the last stage holds the norm and the head.

k comes from the config, or (k='auto') from FLOPs so that stage 0 is not the straggler:
    stage-0 cost per LLM token = vit_cost + k * layer_cost,   later stages = (L - k) / (p - 1) * layer_cost
    => k = (L - (p - 1) * vit_cost / layer_cost) / p
where vit_cost is the ViT + merger work per LLM token at the configured vision fraction f (a vision token is
4 ViT patch rows: 4 * f rows per LLM token).

Tied embeddings across stages: the last stage keeps its own copy of the embedding module, whose weight is its
lm_head.weight (same values, same FQN embed_tokens.weight as stage 0's, so checkpoints and optimizer state
need no renaming across layouts); after each backward the engine sums the two gradients over a 2-rank group
(Megatron's embedding group), so both copies take identical optimizer steps.
"""

from __future__ import annotations

import torch.nn as nn

from model.config import ModelConfig


# ------------------------------------------------------------------------------------------ FLOPs
def decoder_layer_flops_per_token(cfg: ModelConfig, context: int = 2048) -> float:
    """Forward FLOPs of one decoder layer per token (matmuls + causal attention at `context` tokens)."""
    t = cfg.text
    D, Dh, H, Hkv, inter = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads, t.intermediate_size
    proj = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + 3 * D * inter
    attn = 2 * H * Dh * context / 2  # QK^T and AV, causal: half the context on average
    return 2.0 * proj + 2.0 * attn


def vit_flops_per_row(cfg: ModelConfig, context: int = 1024) -> float:
    """Forward FLOPs of the ViT per patch row (patch embed + blocks + merger share), full attention."""
    v = cfg.vision
    C = v.embed_dim
    block = 4 * C * C + 2 * C * v.mlp_dim
    attn = 2 * C * context
    merge = v.spatial_merge_size**2
    merger = (merge * C * merge * C + merge * C * cfg.text.hidden_size) / merge
    return 2.0 * (v.patch_dim * C + v.depth * (block + attn) + merger)


def auto_first_stage_layers(cfg: ModelConfig, pp: int, vision_fraction: float) -> int:
    """k for stage 0 balancing ViT + k layers against (L - k) / (p - 1) layers per later stage."""
    L = cfg.text.num_layers
    if pp == 1:
        return L
    rows_per_token = vision_fraction * cfg.vision.spatial_merge_size**2
    vit_in_layers = rows_per_token * vit_flops_per_row(cfg) / decoder_layer_flops_per_token(cfg)
    k = round((L - (pp - 1) * vit_in_layers) / pp)
    return max(1, min(k, L - (pp - 1)))


def stage_layer_ids(cfg: ModelConfig, pp: int, first_stage_layers: int | str, vision_fraction: float = 0.25):
    """Global decoder-layer indices of every stage: list of pp lists."""
    L = cfg.text.num_layers
    if pp == 1:
        return [list(range(L))]
    if pp > L:
        raise ValueError(f"pp={pp} stages need at least {pp} decoder layers, the model has text.num_layers={L}")
    k = auto_first_stage_layers(cfg, pp, vision_fraction) if first_stage_layers == "auto" else int(first_stage_layers)
    if not 1 <= k <= L - (pp - 1):
        raise ValueError(
            f"pp_first_stage_layers={k} leaves {L - k} layers for {pp - 1} later stages (each needs >= 1); "
            f"choose k in [1, {L - (pp - 1)}] or 'auto'"
        )
    rest = L - k
    base, extra = divmod(rest, pp - 1)
    sizes = [k] + [base + (1 if i < extra else 0) for i in range(pp - 1)]
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


# ------------------------------------------------------------------------------------------ pruning
def prune_to_stage(model: nn.Module, stage: int, layer_ids: list[list[int]]) -> nn.Module:
    """Keep only what pipeline stage `stage` runs (in place; returns the model). FQNs are unchanged."""
    pp = len(layer_ids)
    if pp == 1:
        return model
    keep = {str(i) for i in layer_ids[stage]}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    first, last = stage == 0, stage == pp - 1
    tied = model.lm_head is not None and model.embed_tokens is not None and (
        model.lm_head.weight is model.embed_tokens.weight
    )
    if not first:
        model.visual = None
        if not (last and tied):
            # NOTE: with tied embeddings the last stage keeps the embedding module as its head (Megatron's
            # embedding group): its own copy of the matrix, named embed_tokens.weight like stage 0's, which the
            # engine's tie all-reduce keeps equal. The forward never embeds there (it gets hidden_states).
            model.embed_tokens = None
    if not last:
        model.norm = None
        model.lm_head = None
    return model
