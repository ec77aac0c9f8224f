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
                        grads  max(2G, 4G/dp): bf16 gradients accumulate unsharded over the microbatches and are
                        reduce-scattered into fp32 shards unit by unit on the last one, each unit's unsharded
                        gradient freed as its shard appears, so the two never add up
  fp32                  params 4N + 4N/dp, grads max(4G, 4G/dp)
  ZeRO-3                the unsharded terms become one FSDP unit (the largest block) instead of the whole stage
  AdamW                 8G/dp (exp_avg, exp_avg_sq in fp32)
Activations (per microbatch of data.max_tokens tokens and, on stage 0, data.max_patches ViT rows; and again with
the longest microbatch the recipe allows, a video sample of data.max_video_sample_tokens / _patches alone) count
the tensors autograd keeps per block for the chosen activation checkpointing, divided by tp where TP/SP shards
them; 1F1B keeps min(m, pp - stage) microbatches in flight on each stage; the backward of a block holds the
gradients of its intermediate tensors (one block's activations without checkpointing again); the last stage
adds one chunk of fp32 logits (parallel.loss_chunk_size x vocab/tp) and its gradient, and, when the head
trains, the fused loss head's fp32 weight gradient (vocab/tp x width), kept from the head's forward to the
backward (model/loss.py). Each component is counted at its own high point, so the total is an upper bound
(benchmarks/memory_check.py compares it with a measured CPU step). Not included: allocator fragmentation,
communication buffers and the CUDA context (~1-3 GB; docs/perf/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from model.config import ModelConfig
from model.family import get_family
from model.flops import batch_flops, llm_forward_flops, vit_flops_per_patch
from model.lora import is_adapter_key
from model.loss import DEFAULT_CHUNK_SIZE
from model.meta import meta_model
from parallel import ParallelDims
from parallel.pipeline_split import prune_to_stage, stage_layer_ids
from parallel.tensor_parallel import check_tp_divisibility
from train.config import GROUPS, JobConfig
from train.formatting import si
from train.lora import apply_recipe_lora
from train.lora import trainable_by_group as trainable_by_group_of
from train.optim import apply_freeze
from train.start import Weights, run_model_config

GB = 1e9


def tp_roles(mod: nn.Module) -> dict[str, str]:
    """{parameter FQN: 'split' | 'whole'} of the projections a (stage of a) model shards over tp, from its family's
    declared roles (model/family.py; parallel/tensor_parallel.py applies the same ones): a colwise weight and bias,
    a rowwise weight are split; a rowwise bias is whole; of a LoRA adapter (model/lora.py), the factor on the split
    side is split (colwise: B, rowwise: A), the other whole."""
    plan = get_family(mod.cfg.family).plan(mod.cfg)
    out: dict[str, str] = {}
    for blocks, roles in ((mod.vision_blocks(), plan.vision_block), (mod.named_decoder_layers(), plan.decoder_layer)):
        for prefix, blk in blocks:
            for path, role in roles.items():
                if role not in ("colwise", "rowwise"):
                    continue
                for n, _ in blk.get_submodule(path).named_parameters():
                    factor = n.split(".")[0] if is_adapter_key(f"{path}.{n}") else None
                    if factor is not None:
                        split = factor == ("lora_B" if role == "colwise" else "lora_A")
                    else:
                        split = role == "colwise" or n.endswith("weight")
                    out[f"{prefix}.{path}.{n}"] = "split" if split else "whole"
    return out


def local_numel(fqn: str, numel: int, tp: int, roles: dict[str, str]) -> int:
    """Elements of parameter `fqn` held by one tp rank (before the dp split); `roles` from tp_roles()."""
    if tp == 1:
        return numel
    if fqn in ("embed_tokens.weight", "lm_head.weight"):  # vocab-parallel embedding and head
        return math.ceil(numel / tp)
    return math.ceil(numel / tp) if roles.get(fqn) == "split" else numel  # norms, patch embed, mergers: whole


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


@dataclass(frozen=True)
class _Plan:
    """The recipe, its model and its layout: what every step of the dry run reads."""

    cfg: JobConfig
    mcfg: ModelConfig
    world_size: int
    dp: int
    tp: int
    pp: int
    sp: bool
    microbatches: int
    frozen: frozenset[str]
    layer_ids: list[list[int]]


def dry_run(cfg: JobConfig, world_size: int | None = None) -> DryRunReport:
    """Analyze the recipe's layout (see the module doc). Raises ValueError/ConfigError on an invalid layout."""
    plan = _plan(cfg, world_size)
    full = _model_of_run(plan)
    by_group = _params_by_group(plan, full)
    flops, vit_fwd_per_token = _flops(plan, sum(by_group.values()))
    act = _Activations.of(plan)
    stages = [_stage(plan, s, act, vit_fwd_per_token) for s in range(plan.pp)]
    trainable_by_group = trainable_by_group_of(full.named_parameters(), plan.mcfg.family)
    rep = DryRunReport(plan.world_size, plan.dp, plan.tp, plan.pp, plan.microbatches, sum(by_group.values()),
                       by_group, trainable_by_group, stages, flops)
    rep.text = format_report(rep, cfg, plan.mcfg, plan.sp)
    return rep


def _plan(cfg: JobConfig, world_size: int | None) -> _Plan:
    """The architecture (an init_from that is not here, a dry run on a laptop, is not read: the preset's), the
    layout for the world size (validated: pp x dp x tp, tp divisibility) and the pipeline split."""
    p = cfg.parallel
    init = cfg.model.init_from
    mcfg = run_model_config(cfg.model, Weights.at(init) if init is not None and Path(init).exists() else None)
    if world_size is None:
        if p.dp == -1:
            raise ValueError("parallel.dp=-1 fills dp from the world size: pass --world-size N to the dry run")
        world_size = p.pp * p.dp * p.tp
    dims = ParallelDims(p.pp, p.dp, p.tp, world_size)  # validates pp x dp x tp = world size
    check_tp_divisibility(mcfg, dims.tp)
    return _Plan(cfg, mcfg, world_size, dims.dp, dims.tp, dims.pp, p.sequence_parallel and dims.tp > 1,
                 cfg.microbatches_per_rank(dims.dp), frozenset(cfg.frozen_groups),
                 stage_layer_ids(mcfg, dims.pp, p.pp_first_stage_layers, p.pp_vision_fraction))


def _model_of_run(plan: _Plan) -> nn.Module:
    """The meta model as the run builds it: the frozen groups, then the recipe's LoRA adapters (train/lora.py)."""
    mod = meta_model(plan.mcfg)
    apply_freeze(mod.named_parameters(), plan.frozen, get_family(plan.mcfg.family))
    apply_recipe_lora(mod, plan.cfg.lora, plan.frozen, 0)
    return mod


def _params_by_group(plan: _Plan, model: nn.Module) -> dict[str, int]:
    by_group = dict.fromkeys(GROUPS, 0)
    family = get_family(plan.mcfg.family)
    for name, prm in model.named_parameters():
        by_group[family.group_of(name)] += prm.numel()
    return by_group


def _flops(plan: _Plan, n_params: int) -> tuple[dict[str, float], float]:
    """FLOPs per token (model/flops.py) of a typical microbatch: data.max_tokens LLM tokens of which
    pp_vision_fraction are image tokens (32x32-patch images, 256 tokens each), in samples of up to 2048 tokens; and
    the ViT's forward FLOPs per LLM token of that microbatch (stage 0's share in the pipeline balance)."""
    mcfg, T, frac = plan.mcfg, plan.cfg.data.max_tokens, plan.cfg.parallel.pp_vision_fraction
    grids = [(1, 32, 32)] * (int(T * frac) // 256)
    seq = min(T, 2048)
    cu = list(range(0, T + 1, seq)) if T % seq == 0 else [*range(0, T, seq), T]
    trainable = [g for g in GROUPS if g not in plan.frozen]
    f = batch_flops(mcfg, cu, grids, trainable=trainable)
    flops = {
        "per_token_typical": f["per_token"],
        "per_token_llm_text": batch_flops(mcfg, cu, [], trainable=trainable)["llm"] / T,
        "per_patch_vit": vit_flops_per_patch(mcfg, (32, 32), trainable=trainable),
        "six_n": 6.0 * n_params,
        "vision_fraction": frac,
        "sample_len": seq,
    }
    return flops, f["vit_fwd"] / T


@dataclass(frozen=True)
class _Activations:
    """Activation elements one decoder layer keeps per token and one ViT block per patch row, under the recipe's
    activation checkpointing (`dec`, `vit`) and without recomputation (`dec_none`, `vit_none`: what a block being
    recomputed holds), divided by tp where TP/SP shard them."""

    dec: float
    vit: float
    dec_none: float
    vit_none: float
    full: bool
    """Full checkpointing: one block's whole activations are alive during its recomputation."""
    bytes_per_element: int

    @classmethod
    def of(cls, plan: _Plan) -> _Activations:
        p = plan.cfg.parallel
        ac = p.activation_checkpoint
        mode = "none" if ac == "none" else ("op" if ac == "selective" and p.ac_selective == "op" else "full")
        dec, vit = _activation_elems_per_token(plan.mcfg, plan.tp, plan.sp, mode)
        dec_none, vit_none = _activation_elems_per_token(plan.mcfg, plan.tp, plan.sp, "none")
        if ac == "selective" and p.ac_selective == "block":  # every ac_every-th block fully recomputed
            frac = 1.0 / p.ac_every
            dec = frac * dec + (1 - frac) * dec_none
            vit = frac * vit + (1 - frac) * vit_none
        return cls(dec, vit, dec_none, vit_none, mode == "full", 2 if p.mixed_precision == "bf16" else 4)

    def per_microbatch(self, plan: _Plan, stage: int, n_layers: int, tokens: int, rows: int) -> float:
        """Elements one microbatch of `tokens` tokens and `rows` ViT rows keeps on a stage until its backward."""
        el = tokens * n_layers * self.dec
        if stage == 0:
            el += rows * plan.mcfg.vision.depth * self.vit + tokens * plan.mcfg.text.hidden_size
        return el

    def stage_bytes(self, plan: _Plan, stage: int, n_layers: int, tokens: int, rows: int) -> float:
        """Bytes with the stage's 1F1B microbatches in flight, the largest being one of (tokens, rows) and the others
        typical: the longest sample a recipe allows travels alone in its microbatch (data/packing.py)."""
        d = plan.cfg.data
        inflight = min(plan.microbatches, plan.pp - stage) if plan.pp > 1 else 1
        el = (self.per_microbatch(plan, stage, n_layers, tokens, rows)
              + (inflight - 1) * self.per_microbatch(plan, stage, n_layers, d.max_tokens, d.patch_budget))
        one_block = max(tokens * self.dec_none, rows * self.vit_none if stage == 0 else 0)
        el += one_block  # a block's backward: the gradients of its intermediate tensors
        if self.full:  # and one block's full activations alive during its recomputation
            el += one_block
        b = el * self.bytes_per_element
        if stage == plan.pp - 1:  # one chunk of fp32 logits and its gradient
            t = plan.mcfg.text
            chunk = min(plan.cfg.parallel.loss_chunk_size or DEFAULT_CHUNK_SIZE, tokens)
            b += 2 * chunk * t.vocab_size / plan.tp * 4
            if "llm" not in plan.cfg.frozen_groups:  # the fused head's fp32 d/dW, held from its forward to backward
                b += 4 * t.vocab_size / plan.tp * t.hidden_size
        return b


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


def _stage(plan: _Plan, s: int, act: _Activations, vit_fwd_per_token: float) -> StageReport:
    """Stage s as the engine builds it (the same pipeline pruning), per rank."""
    mod = prune_to_stage(_model_of_run(plan), s, plan.layer_ids)
    ids = plan.layer_ids[s]
    k = rank_numel(mod, plan.tp, plan.frozen)
    mem = _memory(plan, k.params, k.trainable, k.largest_unit)
    if plan.cfg.lora is not None:  # gradients + optimizer state this stage would hold without the adapters
        full = _memory(plan, k.params, k.trainable_full, k.largest_unit)
        mem_full_b = full["grads"] + full["optimizer"]
    d = plan.cfg.data
    mem["activations"] = act.stage_bytes(plan, s, len(ids), d.max_tokens, d.patch_budget) / GB
    mem["total"] = sum(mem.values())
    # The longest microbatch the recipe allows: a video sample up to its own budgets (data.max_video_sample_*).
    mem["activations_longest"] = act.stage_bytes(plan, s, len(ids), d.video_sample_tokens,
                                                 d.video_sample_patches) / GB
    mem["total_longest"] = mem["total"] - mem["activations"] + mem["activations_longest"]
    if plan.cfg.lora is not None:
        mem["grads_optim_full_training"] = mem_full_b
    return StageReport(s, ids, _stage_modules(plan, mod, s), k.params, k.trainable,
                       _stage_fwd_flops(plan, s, len(ids), vit_fwd_per_token), mem)


@dataclass
class RankNumel:
    """Elements one tp rank of a (stage of a) model holds, after the tp split and before the dp one."""

    params: int
    trainable: int  # requires_grad: after freezing and LoRA
    largest_unit: int  # parameters of the largest FSDP unit (a transformer block)
    trainable_full: int  # what would train without LoRA: the groups the stage leaves unfrozen, adapters excluded


def rank_numel(mod: nn.Module, tp: int, frozen: Iterable[str] = ()) -> RankNumel:
    """RankNumel of `mod` (a single-device model or pipeline stage, e.g. on the meta device) under `tp`, from its
    family's declared tp roles; each shared tensor (the tied head) once."""
    roles, family, frozen = tp_roles(mod), get_family(mod.cfg.family), set(frozen)
    n_loc = g_loc = g_full = 0
    seen: set[int] = set()
    for name, prm in mod.named_parameters(remove_duplicate=False):
        if id(prm) in seen:  # tied: the head is the embedding (on a pipeline's last stage, its own copy)
            continue
        seen.add(id(prm))
        k = local_numel(name, prm.numel(), tp, roles)
        n_loc += k
        g_loc += k if prm.requires_grad else 0
        g_full += k if family.group_of(name) not in frozen and not is_adapter_key(name) else 0
    largest_unit = max((sum(local_numel(f"{prefix}.{n}", q.numel(), tp, roles)
                            for n, q in blk.named_parameters()) for prefix, blk in mod.transformer_blocks()),
                       default=0)
    return RankNumel(n_loc, g_loc, largest_unit, g_full)


def _memory(plan: _Plan, n_loc: int, g_loc: int, largest_unit: int) -> dict[str, float]:
    """GB per rank of parameters, gradients and optimizer state (the module doc's memory model)."""
    p, dp = plan.cfg.parallel, plan.dp
    zero3 = p.zero_stage == 3  # ZeRO-3 holds one unsharded FSDP unit at a time
    compute_b = 2 if p.mixed_precision == "bf16" else 4  # bytes of the compute copies and their gradients
    if p.mixed_precision == "bf16":
        params_b = (2 * (largest_unit if zero3 else n_loc) + 2 * n_loc / dp * zero3) + 4 * n_loc / dp
    else:
        params_b = 4 * (largest_unit if zero3 else n_loc) + 4 * n_loc / dp
    # ZeRO-1: the unsharded gradients and the fp32 shards they are reduced into never coexist (module doc).
    grads_b = compute_b * largest_unit + 4 * g_loc / dp if zero3 else max(compute_b * g_loc, 4 * g_loc / dp)
    return {"params": params_b / GB, "grads": grads_b / GB, "optimizer": 8 * g_loc / dp / GB}


def _stage_modules(plan: _Plan, mod: nn.Module, s: int) -> list[str]:
    modules = []
    if mod.visual is not None:
        modules += [f"visual ({plan.mcfg.vision.depth} blocks)", "merger"]
    if mod.embed_tokens is not None and s == 0:
        modules.append("embed_tokens")
    ids = plan.layer_ids[s]
    modules.append(f"layers {ids[0]}-{ids[-1]} ({len(ids)})")
    if mod.norm is not None:
        modules += ["norm", "lm_head"]
    return modules


def _stage_fwd_flops(plan: _Plan, s: int, n_layers: int, vit_fwd_per_token: float) -> float:
    """Forward matmul FLOPs per LLM token of one stage, per tp rank (what the pipeline split balances): its decoder
    layers, the LM head on the last stage, the ViT's share on the first (model/flops.py)."""
    one = llm_forward_flops(plan.mcfg, [1])  # the per-token figures
    f = n_layers * (one["layers_linear"] // plan.mcfg.text.num_layers) + (one["head"] if s == plan.pp - 1 else 0)
    if s == 0:
        f += vit_fwd_per_token
    return f / plan.tp


def _h(n: float) -> str:
    """A count in K, M, B (billions), T."""
    return si(n, ("T", "B", "M", "K"))


def _group_state(g: str, frozen: set[str], cfg: JobConfig) -> str:
    """How a parameter group trains in this run: frozen, through LoRA adapters, or fully."""
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
