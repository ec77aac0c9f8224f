"""Pipeline split: which decoder layers each stage holds, and pruning a Qwen2VL down to one stage.

Stage 0 holds the ViT, the merger, the token embedding and the first k decoder layers; the remaining layers
are split evenly over stages 1..p-1 (any remainder goes to the earlier of them, because the last stage also
carries the final norm, the LM head and the loss); the last stage holds the norm and the head.

k comes from the config, or (k='auto') from FLOPs so that stage 0 is not the straggler:
    stage-0 cost per LLM token = vit_cost + k * layer_cost,   later stages = (L - k) / (p - 1) * layer_cost
    => k = (L - (p - 1) * vit_cost / layer_cost) / p
where vit_cost is the ViT + merger work per LLM token at the configured vision fraction f (a vision token is
4 ViT patch rows: 4 * f rows per LLM token).

Interleaved 1F1B (pp_virtual_stages = v > 1): the model is cut into p*v virtual stages with the same rules, and
rank r holds v model chunks, virtual stages r, r+p, ..., each a pruned copy of the model (`copy_stage`: only that
stage's weights are copied) with the single-process FQNs. `merge_stage_modules` joins a rank's chunks into one
module with those FQNs for APIs that take one module (DCP's get/set_optimizer_state_dict).

Tied embeddings across stages: the last stage keeps its own copy of the embedding module, whose weight is its
lm_head.weight (same values, same FQN embed_tokens.weight as stage 0's, so checkpoints and optimizer state
need no renaming across layouts); after each backward the engine sums the two gradients over a 2-rank group
(Megatron's embedding group), so both copies take identical optimizer steps.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from model.config import ModelConfig
from model.family import get_family
from model.flops import batch_flops, llm_forward_flops
from model.vlm import TOP_MODULES


# ------------------------------------------------------------------------------------------ FLOPs
def decoder_layer_flops_per_token(cfg: ModelConfig, context: int = 2048) -> float:
    """Forward FLOPs of one decoder layer per token for samples of `context` tokens (model.flops' count)."""
    f = llm_forward_flops(cfg, [context])
    return (f["layers_linear"] + f["layers_attention"]) / (cfg.text.num_layers * context)


def vit_flops_per_row(cfg: ModelConfig, grid_hw: tuple[int, int] = (32, 32)) -> float:
    """Forward FLOPs of the ViT + merger per patch row for one image of grid_hw patches (model.flops' count)."""
    f = batch_flops(cfg, [0, 0], [(1, *grid_hw)], trainable=())
    return f["vit_fwd"] / (grid_hw[0] * grid_hw[1])


def auto_first_stage_layers(cfg: ModelConfig, pp: int, vision_fraction: float) -> int:
    """k for stage 0 balancing ViT + k layers against (L - k) / (p - 1) layers per later stage."""
    L = cfg.text.num_layers
    if pp == 1:
        return L
    rows_per_token = vision_fraction * cfg.vision.spatial_merge_size**2
    vit_in_layers = rows_per_token * vit_flops_per_row(cfg) / decoder_layer_flops_per_token(cfg)
    k = round((L - (pp - 1) * vit_in_layers) / pp)
    least = max(1, get_family(cfg.family).stage0_decoder_layers(cfg))
    return max(least, min(k, L - (pp - 1)))


def stage_layer_ids(cfg: ModelConfig, pp: int, first_stage_layers: int | str, vision_fraction: float = 0.25):
    """Global decoder-layer indices of every stage: list of pp lists."""
    L = cfg.text.num_layers
    if pp == 1:
        return [list(range(L))]
    if pp > L:
        raise ValueError(f"{pp} pipeline stages (pp x pp_virtual_stages) need at least {pp} decoder layers, the "
                         f"model has text.num_layers={L}; use fewer stages")
    k = auto_first_stage_layers(cfg, pp, vision_fraction) if first_stage_layers == "auto" else int(first_stage_layers)
    least = max(1, get_family(cfg.family).stage0_decoder_layers(cfg))
    if least > L - (pp - 1):
        raise ValueError(f"{pp} pipeline stages leave stage 0 at most {L - (pp - 1)} decoder layers, but "
                         f"{get_family(cfg.family).title}'s DeepStack needs its first {least} layers there, beside "
                         "the ViT; use fewer stages")
    if not least <= k <= L - (pp - 1):
        why = (f" (DeepStack adds vision features after decoder layers 0..{least - 1}, which must run with the ViT)"
               if least > 1 else "")
        raise ValueError(
            f"pp_first_stage_layers={k} leaves {L - k} layers for {pp - 1} later stages (each needs >= 1){why}; "
            f"choose k in [{least}, {L - (pp - 1)}] or 'auto'"
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
def _is_tied(model: nn.Module) -> bool:
    return model.lm_head is not None and model.embed_tokens is not None and (
        model.lm_head.weight is model.embed_tokens.weight
    )


def _kept_top_modules(stage: int, num_stages: int, tied: bool) -> set[str]:
    """The top modules pipeline stage `stage` runs: ViT and embedding first, norm and head last."""
    kept = set()
    if stage == 0:
        kept |= {name for name, where in TOP_MODULES.items() if where == "first"}
    if stage == num_stages - 1:
        kept |= {name for name, where in TOP_MODULES.items() if where == "last"}
        if tied:
            # NOTE: with tied embeddings the last stage keeps the embedding module as its head (Megatron's
            # embedding group): its own copy of the matrix, named embed_tokens.weight like stage 0's, which the
            # engine's tie all-reduce keeps equal. The forward never embeds there (it gets hidden_states).
            kept.add("embed_tokens")
    return kept


def prune_to_stage(model: nn.Module, stage: int, layer_ids: list[list[int]]) -> nn.Module:
    """Keep only what pipeline stage `stage` runs (in place; returns the model). FQNs are unchanged."""
    pp = len(layer_ids)
    if pp == 1:
        return model
    keep = {str(i) for i in layer_ids[stage]}
    layers = model.decoder_layers()
    for name in list(layers.keys()):
        if name not in keep:
            del layers[name]
    kept = _kept_top_modules(stage, pp, _is_tied(model))
    for name in TOP_MODULES:
        if name not in kept:
            setattr(model, name, None)
    return model


def copy_stage(model: nn.Module, stage: int, layer_ids: list[list[int]]) -> nn.Module:
    """A deep copy of `model` pruned to `stage`; only that stage's modules are copied, `model` is unchanged."""
    keep = {str(i) for i in layer_ids[stage]}
    kept = _kept_top_modules(stage, len(layer_ids), _is_tied(model))
    saved = dict(model._modules)
    try:
        # Hide what the stage does not hold while copying (deepcopy follows _modules).
        layers = model.decoder_layers()
        attr = next(n for n, m in saved.items() if m is layers)
        model._modules[attr] = nn.ModuleDict({k: m for k, m in layers.items() if k in keep})
        for name in TOP_MODULES:
            if name not in kept:
                model._modules[name] = None
        return copy.deepcopy(model)
    finally:
        model._modules.clear()
        model._modules.update(saved)


def merge_stage_modules(modules: list[nn.Module]) -> nn.Module:
    """One module over a rank's model chunks with the single-process FQNs (one chunk: that chunk itself).

    ModuleDict children (the decoder layers, keyed by global index) are merged; any other child belongs to one
    chunk, except stateless ones (the rotary embedding: no parameters, no persistent buffers), taken from the
    first. The result shares every module with the chunks (no copies)."""
    if len(modules) == 1:
        return modules[0]
    view = nn.Module()
    for chunk in modules:
        if next(chunk.parameters(recurse=False), None) is not None:
            raise ValueError(f"{type(chunk).__name__} has parameters of its own; merge_stage_modules merges children")
        for name, child in chunk.named_children():
            have = view._modules.get(name)
            if isinstance(child, nn.ModuleDict):
                if have is None:
                    have = nn.ModuleDict()
                    view.add_module(name, have)
                for key, sub in child.items():
                    if key in have:
                        raise ValueError(f"{name}.{key} is in two pipeline chunks of this rank")
                    have[key] = sub
            elif have is None:
                view.add_module(name, child)
            elif _has_state(child) or _has_state(have):
                raise ValueError(f"{name} is in two pipeline chunks of this rank")
    return view


def _has_state(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None or bool(module.state_dict())
