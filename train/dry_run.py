"""`python -m train RECIPE.yaml --dry-run [--world-size N]`: validate a recipe's layout without any GPU.

Builds the model on the meta device, splits it exactly as the engine would (parallel.stage_layer_ids and
pipeline pruning), applies the engine's tensor-parallel plans analytically (which parameters are sharded over
tp, per parallel/tensor_parallel.py), and prints:
  - parameters: total, per group (vision, merger, llm) with trainable / frozen;
  - the pipeline split: layers and modules per stage, parameters per rank, forward FLOPs per token per stage;
  - memory per rank for every stage (parameters, gradients, optimizer state, activations estimate);
  - FLOPs per token (model.flops) for the stage's trainable groups.
No process group is created: a 72B recipe for 128 GPUs validates on a laptop.

Memory model (bytes per local parameter element; N = this rank's parameters after the tp split, G = its
trainable ones, dp = data-parallel degree):
  bf16 mixed precision  params 2N (bf16 compute copy, unsharded for the step under ZeRO-1) + 4N/dp (fp32 master)
                        grads  2G (bf16, accumulated unsharded over microbatches) + 4G/dp (fp32 after reduce-scatter)
  fp32                  params 4N + 4N/dp, grads 4G + 4G/dp
  ZeRO-3                the unsharded terms become one FSDP unit (the largest block) instead of the whole stage
  AdamW                 8G/dp (exp_avg, exp_avg_sq in fp32)
Activations (per microbatch of data.max_tokens tokens and, on stage 0, data.max_patches ViT rows; and again with
the longest microbatch the recipe allows, a video sample of data.max_video_sample_tokens / _patches alone) count
the tensors autograd keeps per block for the chosen activation checkpointing, divided by tp where TP/SP shards
them; 1F1B keeps min(m, pp - stage) microbatches in flight on each stage; the last stage adds one
chunk of fp32 logits (parallel.loss_chunk_size x vocab/tp) and its gradient. It is an estimate (allocator
fragmentation, communication buffers and the CUDA context, ~1-3 GB, are not included).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from model.config import ModelConfig
from model.flops import batch_flops
from model.lora import is_adapter_key
from model.loss import DEFAULT_CHUNK_SIZE
from parallel import ParallelDims
from parallel.pipeline_split import prune_to_stage, stage_layer_ids
from parallel.tensor_parallel import check_tp_divisibility, decoder_layer_plan, vision_block_plan
from train.config import GROUPS, JobConfig
from train.lora import apply_recipe_lora, tp_local_numel
from train.lora import trainable_by_group as trainable_by_group_of
from train.optim import apply_freeze, group_of
from train.weights import meta_model, resolve_model_config

_FLOPS_GROUP = {"vision": "vit", "merger": "merger", "llm": "llm"}
GB = 1e9


@functools.cache
def _tp_sharded_names(sp: bool) -> tuple[dict[str, str], dict[str, str]]:
    """{module suffix: 'col'|'row'} of a decoder layer and of a ViT block, from the engine's own plans."""

    def kinds(plan: dict) -> dict[str, str]:
        out = {}
        for name, style in plan.items():
            if isinstance(style, ColwiseParallel):
                out[name] = "col"
            elif isinstance(style, RowwiseParallel):
                out[name] = "row"
        return out

    return kinds(decoder_layer_plan(sp, first=False)), kinds(vision_block_plan(sp, first=False))


def local_numel(fqn: str, numel: int, tp: int, sp: bool) -> int:
    """Elements of parameter `fqn` held by one tp rank (before the dp split)."""
    if tp == 1:
        return numel
    dec, vit = _tp_sharded_names(sp)
    parts = fqn.split(".")
    if fqn in ("embed_tokens.weight", "lm_head.weight"):  # vocab-parallel embedding and head
        return math.ceil(numel / tp)
    if parts[0] == "layers":
        suffix, kind = ".".join(parts[2:-1]), parts[-1]
        style = dec.get(suffix)
    elif parts[:2] == ["visual", "blocks"]:
        suffix, kind = ".".join(parts[3:-1]), parts[-1]
        style = vit.get(suffix)
    else:
        return numel  # norms, patch embed, merger: replicated
    if style == "col" or (style == "row" and kind == "weight"):
        return math.ceil(numel / tp)
    return numel  # rowwise bias: replicated


@dataclass
class StageReport:
    stage: int
    layers: list[int]
    modules: list[str]
    params: int  # per rank (after tp split, before dp split)
    trainable: int
    fwd_flops_per_token: float
    memory: dict[str, float] = field(default_factory=dict)  # GB per rank


@dataclass
class DryRunReport:
    world_size: int
    dp: int
    tp: int
    pp: int
    microbatches: int
    params_total: int
    params_by_group: dict[str, int]
    trainable_by_group: dict[str, int]
    stages: list[StageReport]
    flops: dict[str, float]
    text: str = ""

    @property
    def max_memory_gb(self) -> float:
        return max(s.memory["total"] for s in self.stages)


def _activation_elems_per_token(mcfg: ModelConfig, tp: int, sp: bool, ac: str) -> tuple[float, float]:
    """(decoder layer, ViT block) activation elements kept per token/patch for one block."""
    t, v = mcfg.text, mcfg.vision
    D, Dh, H, Hkv, Ff = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads, t.intermediate_size
    C, Fv = v.embed_dim, v.mlp_dim
    s = tp if sp else 1  # SP shards the residual stream / norm inputs along the sequence
    # No recomputation: norm inputs (fp32 statistics: x2), gathered norm outputs feeding the projections,
    # q/k before and after rotary, v, attention output, the SwiGLU's gate/up/act/product.
    dec_none = 2 * 2 * D / s + 2 * D + (2 * H + 3 * Hkv) * Dh / tp + H * Dh / tp + 4 * Ff / tp
    vit_none = 2 * 2 * C / s + 2 * C + 5 * C / tp + C / tp + 3 * Fv / tp
    # Per-op selective: keep matmul / attention / collective outputs, plus the block input.
    dec_sel = D / s + 2 * D + (H + 2 * Hkv) * Dh / tp + H * Dh / tp + 2 * D / s + 2 * Ff / tp
    vit_sel = C / s + 2 * C + 3 * C / tp + C / tp + 2 * C / s + Fv / tp
    if ac == "none":
        return dec_none, vit_none
    if ac == "op":
        return dec_sel, vit_sel
    return D / s, C / s  # full: only the block input (one block is recomputed at a time: added separately)


def dry_run(cfg: JobConfig, world_size: int | None = None) -> DryRunReport:
    """Analyze the recipe's layout (see the module doc). Raises ValueError/ConfigError on an invalid layout."""
    p = cfg.parallel
    mcfg = resolve_model_config(cfg.model, require_init=False)
    if world_size is None:
        if p.dp == -1:
            raise ValueError("parallel.dp=-1 fills dp from the world size: pass --world-size N to the dry run")
        world_size = p.pp * p.dp * p.tp
    dims = ParallelDims(p.pp, p.dp, p.tp, world_size)  # validates pp x dp x tp = world size
    dp, tp, pp = dims.dp, dims.tp, dims.pp
    check_tp_divisibility(mcfg, tp)
    sp = p.sequence_parallel and tp > 1
    from train.trainer import microbatches_per_rank

    m = microbatches_per_rank(cfg, dp)
    frozen = set(cfg.frozen_groups)
    layer_ids = stage_layer_ids(mcfg, pp, p.pp_first_stage_layers, p.pp_vision_fraction)

    def model_of_run():
        """The meta model as the run builds it: frozen groups, then the recipe's LoRA adapters (train/lora.py)."""
        mod = meta_model(mcfg)
        apply_freeze(mod.named_parameters(), frozen)
        apply_recipe_lora(mod, cfg.lora, frozen, 0)
        return mod

    full = model_of_run()
    by_group = dict.fromkeys(GROUPS, 0)
    for name, prm in full.named_parameters():
        by_group[group_of(name)] += prm.numel()
    trainable_by_group = trainable_by_group_of(full.named_parameters(), mcfg.family)

    # FLOPs per token of a typical microbatch: data.max_tokens LLM tokens of which pp_vision_fraction are
    # image tokens (32x32-patch images, 256 tokens each), in samples of up to 2048 tokens.
    T = cfg.data.max_tokens
    n_img_tok = int(T * p.pp_vision_fraction)
    grids = [(1, 32, 32)] * (n_img_tok // 256)
    seq = min(T, 2048)
    cu = list(range(0, T + 1, seq)) if T % seq == 0 else [*range(0, T, seq), T]
    trainable = [_FLOPS_GROUP[g] for g in GROUPS if g not in frozen]
    f = batch_flops(mcfg, cu, grids, trainable=trainable)
    flops = {
        "per_token_typical": f["per_token"],
        "per_token_llm_text": batch_flops(mcfg, cu, [], trainable=trainable)["llm"] / T,
        "per_patch_vit": (batch_flops(mcfg, [0, 0], [(1, 32, 32)], trainable=trainable)["vit"] / 1024),
        "six_n": 6.0 * sum(by_group.values()),
        "vision_fraction": p.pp_vision_fraction,
        "sample_len": seq,
    }

    act_dtype = 2 if p.mixed_precision == "bf16" else 4
    ac = p.activation_checkpoint
    ac_mode = "none" if ac == "none" else ("op" if ac == "selective" and p.ac_selective == "op" else "full")
    dec_el, vit_el = _activation_elems_per_token(mcfg, tp, sp, ac_mode)
    dec_none, vit_none = _activation_elems_per_token(mcfg, tp, sp, "none")
    if ac == "selective" and p.ac_selective == "block":  # every ac_every-th block fully recomputed
        frac = 1.0 / p.ac_every
        dec_el = frac * dec_el + (1 - frac) * dec_none
        vit_el = frac * vit_el + (1 - frac) * vit_none
    N = cfg.data.patch_budget
    # The longest microbatch the recipe allows: a video sample up to its own budgets (data.max_video_sample_*).
    T_long, N_long = cfg.data.video_sample_tokens, cfg.data.video_sample_patches

    stages = []
    for s in range(pp):
        mod = prune_to_stage(model_of_run(), s, layer_ids)
        n_loc = g_loc = g_full = 0  # g_full: the trainable elements of the same stage without LoRA
        largest_unit = 0
        seen: set[int] = set()
        for name, prm in mod.named_parameters(remove_duplicate=False):
            if id(prm) in seen:  # tied: the head is the embedding (on a pipeline's last stage, its own copy)
                continue
            seen.add(id(prm))
            k = tp_local_numel(name, prm.numel(), tp, mcfg) if is_adapter_key(name) else local_numel(
                name, prm.numel(), tp, sp)
            n_loc += k
            g_loc += k if prm.requires_grad else 0
            g_full += k if group_of(name) not in frozen and not is_adapter_key(name) else 0
        units = [(f"layers.{i}", b) for i, b in mod.layers.items()]
        if mod.visual is not None:
            units += [(f"visual.blocks.{i}", b) for i, b in mod.visual.blocks.items()]
        for prefix, blk in units:  # ZeRO-3 holds one unsharded FSDP unit at a time
            unit = sum(local_numel(f"{prefix}.{n}", q.numel(), tp, sp) for n, q in blk.named_parameters())
            largest_unit = max(largest_unit, unit)
        modules = []
        if mod.visual is not None:
            modules += [f"visual ({mcfg.vision.depth} blocks)", "merger"]
        if mod.embed_tokens is not None and s == 0:
            modules.append("embed_tokens")
        ids = layer_ids[s]
        modules.append(f"layers {ids[0]}-{ids[-1]} ({len(ids)})")
        if mod.norm is not None:
            modules += ["norm", "lm_head"]
        # Memory (GB per rank)
        zero3 = p.zero_stage == 3
        if p.mixed_precision == "bf16":
            params_b = (2 * (largest_unit if zero3 else n_loc) + 2 * n_loc / dp * zero3) + 4 * n_loc / dp
            grads_b = 2 * (largest_unit if zero3 else g_loc) + 4 * g_loc / dp
        else:
            params_b = 4 * (largest_unit if zero3 else n_loc) + 4 * n_loc / dp
            grads_b = 4 * (largest_unit if zero3 else g_loc) + 4 * g_loc / dp
        optim_b = 8 * g_loc / dp
        full_training_b = (2 if p.mixed_precision == "bf16" else 4) * g_full + 4 * g_full / dp + 8 * g_full / dp
        inflight = min(m, pp - s) if pp > 1 else 1

        def per_mb(tokens: int, rows: int, stage: int = s, n_layers: int = len(ids)) -> float:
            """Activation elements one microbatch keeps on this stage until its backward."""
            el = tokens * n_layers * dec_el
            if stage == 0:
                el += rows * mcfg.vision.depth * vit_el + tokens * mcfg.text.hidden_size
            return el

        def activations(tokens: int, rows: int, stage: int = s, inflight: int = inflight) -> float:
            """Bytes with `inflight` microbatches alive, the largest being one of (tokens, rows) and the others
            typical: the longest sample a recipe allows travels alone in its microbatch (data/packing.py)."""
            el = per_mb(tokens, rows) + (inflight - 1) * per_mb(T, N)
            if ac_mode == "full":  # one block's full activations alive during its recomputation
                el += max(tokens * dec_none, rows * vit_none if stage == 0 else 0)
            b = el * act_dtype
            if stage == pp - 1:
                b += 2 * min(p.loss_chunk_size or DEFAULT_CHUNK_SIZE, tokens) * mcfg.text.vocab_size / tp * 4
            return b

        act_b = activations(T, N)
        act_long_b = activations(T_long, N_long)
        mem = {"params": params_b / GB, "grads": grads_b / GB, "optimizer": optim_b / GB, "activations": act_b / GB}
        mem["total"] = sum(mem.values())
        if cfg.lora is not None:  # gradients + optimizer state this stage would hold without the adapters (ZeRO-1)
            mem["grads_optim_full_training"] = full_training_b / GB
        mem["activations_longest"] = act_long_b / GB
        mem["total_longest"] = mem["total"] - mem["activations"] + mem["activations_longest"]
        # forward FLOPs per LLM token of this stage (for the balance of the split)
        lf = 2 * len(ids) * _layer_matmul_params(mcfg) + (2 * mcfg.text.hidden_size * mcfg.text.vocab_size
                                                         if s == pp - 1 else 0)
        if s == 0:
            lf += f["vit_fwd"] / T
        stages.append(StageReport(s, ids, modules, n_loc, g_loc, lf / tp, mem))

    rep = DryRunReport(world_size, dp, tp, pp, m, sum(by_group.values()), by_group, trainable_by_group, stages, flops)
    rep.text = format_report(rep, cfg, mcfg, sp)
    return rep


def _layer_matmul_params(mcfg: ModelConfig) -> int:
    t = mcfg.text
    kv = t.num_kv_heads * t.head_dim
    return 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size


def _h(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _group_state(g: str, frozen: set[str], cfg: JobConfig) -> str:
    if g in frozen:
        return "frozen"
    if cfg.lora is not None and cfg.lora.targets(g):
        return "LoRA adapters"
    return "frozen" if cfg.lora is not None and g not in cfg.lora.fully_trainable else "trainable"


def format_report(r: DryRunReport, cfg: JobConfig, mcfg: ModelConfig, sp: bool) -> str:
    p = cfg.parallel
    frozen = set(cfg.frozen_groups)
    lines = [
        f"dry run (meta device, no process group): stage {cfg.train.stage}, model "
        f"{cfg.model.preset or cfg.model.hf_config or cfg.model.init_from}",
        f"layout: pp{r.pp} x dp{r.dp} x tp{r.tp} = {r.world_size} ranks | SP {'on' if sp else 'off'} | "
        f"ZeRO-{p.zero_stage} | {p.mixed_precision} | activation checkpointing {p.activation_checkpoint}"
        + (f"/{p.ac_selective}" if p.activation_checkpoint == "selective" else ""),
        f"batch: {r.microbatches} microbatches per dp rank per step x {r.dp} dp = {r.microbatches * r.dp} global "
        f"microbatches of <= {cfg.data.max_tokens} tokens (~{_h(r.microbatches * r.dp * cfg.data.max_tokens)} "
        f"tokens per step), {cfg.train.steps} steps",
        *(
            [f"init_from: {cfg.model.init_from}"
             + ("" if Path(cfg.model.init_from).exists() else " (not present here: not read by the dry run)")]
            if cfg.model.init_from else []
        ),
        "parameters: total " + _h(r.params_total) + " | " + " | ".join(
            f"{g} {_h(n)} ({_group_state(g, frozen, cfg)})" for g, n in r.params_by_group.items()
        ),
        f"trainable: {_h(sum(r.trainable_by_group.values()))}"
        + (f" ({100 * sum(r.trainable_by_group.values()) / r.params_total:.2f}%, LoRA)" if cfg.lora else ""),
        "pipeline split:" if r.pp > 1 else "pipeline: none (pp=1)",
    ]
    for s in r.stages:
        lines.append(
            f"  stage {s.stage}: {', '.join(s.modules)} | per rank {_h(s.params)} params ({_h(s.trainable)} trainable)"
            f" | fwd {_h(s.fwd_flops_per_token)}FLOP/token/rank"
        )
    d = cfg.data
    lines.append(f"memory per rank, GB (estimate; see train/dry_run.py): typical microbatch <= {d.max_tokens} tokens / "
                 f"{d.patch_budget} ViT rows; longest one allowed (a video sample alone) {d.video_sample_tokens} "
                 f"tokens / {d.video_sample_patches} rows")
    lines.append(f"  {'stage':>5} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8} "
                 f"{'activ*':>8} {'total*':>8}   (* with the longest microbatch in flight)")
    for s in r.stages:
        mm = s.memory
        lines.append(
            f"  {s.stage:>5} {mm['params']:8.2f} {mm['grads']:8.2f} {mm['optimizer']:8.2f} "
            f"{mm['activations']:8.2f} {mm['total']:8.2f} {mm['activations_longest']:8.2f} {mm['total_longest']:8.2f}"
        )
    if cfg.lora is not None:
        lo = cfg.lora
        lines.append(f"LoRA: rank {lo.rank}, alpha {lo.alpha:g}{' (rslora)' if lo.rslora else ''}, targets "
                     + ", ".join(f"{g} {lo.targets(g)}" for g in GROUPS if lo.targets(g))
                     + (f", fully trained {lo.fully_trainable}" if lo.fully_trainable else "")
                     + " | gradients + optimizer state per rank, GB, full training -> LoRA (saved):")
        for s in r.stages:
            mm = s.memory
            lora_b = mm["grads"] + mm["optimizer"]
            lines.append(f"  stage {s.stage}: {mm['grads_optim_full_training']:.2f} -> {lora_b:.2f} "
                         f"({mm['grads_optim_full_training'] - lora_b:.2f} saved)")
    f = r.flops
    lines.append(
        f"FLOPs per token (fwd+bwd, trainable: {', '.join(g for g in GROUPS if g not in frozen)}): "
        f"typical microbatch ({int(100 * f['vision_fraction'])}% image tokens, samples of {f['sample_len']}) "
        f"{_h(f['per_token_typical'])} | text-only LLM {_h(f['per_token_llm_text'])} | per ViT patch "
        f"{_h(f['per_patch_vit'])} | 6N = {_h(f['six_n'])}"
    )
    return "\n".join(lines)


def summary_dict(r: DryRunReport) -> dict[str, Any]:
    return {
        "world_size": r.world_size, "dp": r.dp, "tp": r.tp, "pp": r.pp, "params_total": r.params_total,
        "params_by_group": r.params_by_group, "trainable_by_group": r.trainable_by_group,
        "stages": [{"stage": s.stage, "layers": s.layers, "params": s.params, "memory_gb": s.memory} for s in r.stages],
        "flops": r.flops,
    }
