"""parallelize(): PP split -> TP/SP -> activation checkpointing -> compile -> FSDP2, and the ParallelModel that runs
steps.

One documented order (torchtitan's): the pipeline split prunes the model to this rank's stage first, tensor
parallelism shards what is left, activation checkpointing sets each block's recompute function (it recomputes
the block's body only, so TP's and FSDP's module hooks stay outside the region: parallel/checkpointing.py),
compile wraps blocks, FSDP2 shards over dp last.

A step (ParallelModel.step):
  1. stage 0 pads each microbatch for SP (when tp > 1) and, with pp > 1, broadcasts the step's lengths and
     small tensors to its pipeline group (parallel/pipeline_schedule.py);
  2. every rank learns the GLOBAL supervised-token count (all-reduce over dp) before any backward, so each
     microbatch backpropagates loss_sum / global_count and nothing divides twice;
  3. the 1F1B schedule runs (with pp = 1 it is plain gradient accumulation); FSDP reduces gradients on the
     last microbatch only (ZeRO-1);
  4. post-backward: the pipeline-tied embedding's two gradients are summed, the gradients of weights that
     every tp rank computes redundantly (patch embed, mergers) are averaged over tp, so they cannot drift, and
     those applied to each rank's own heads (Qwen3's QK-norm) are summed;
  5. the loss is summed over dp and sent to every rank.

With pp_schedule='interleaved_1f1b' a rank holds pp_virtual_stages model chunks (`modules`), virtual stages
r, r + pp, ... of the pp * v-stage split, each a pruned copy of the model with single-process FQNs and its own
TP plan and FSDP root; the same step runs the interleaved program (parallel/pipeline_schedule.py).

ParallelModel.evaluate runs the same path forward-only (no gradients, no gradient sync) and returns the loss
normalized like the training loss.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from core.batch import IGNORE_INDEX, PackedBatch
from model.loss import DEFAULT_CHUNK_SIZE, lm_loss, supervised_positions
from parallel.checkpointing import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_fsdp, set_microbatch_flags
from parallel.dims import ParallelDims
from parallel.pipeline_schedule import (
    MicrobatchMeta,
    PipelineExecutor,
    ScheduleStats,
    broadcast_step_metadata,
    metas_from_batches,
)
from parallel.pipeline_split import copy_stage, prune_to_stage, stage_layer_ids
from parallel.tensor_parallel import apply_tensor_parallel, check_tp_divisibility, pad_microbatch
from parallel.vocab_parallel import make_loss_fn


@dataclass
class StepResult:
    """What one optimizer step's forward/backward measured (identical on every rank)."""

    loss_t: torch.Tensor
    """Global mean loss as a 0-dim fp64 tensor on the device: sum of supervised-token cross-entropies over all dp
    ranks and microbatches divided by their count (0 when nothing was supervised). Kept on the device so the step
    never waits for it; `loss` reads it."""
    num_tokens: int
    """Global packed tokens (before SP padding), all dp ranks and microbatches."""
    num_supervised: int
    """Global supervised tokens (the loss denominator)."""
    num_microbatches: int
    """Global microbatches (dp x per-rank count)."""
    padded_tokens: int
    """Global tokens added by sequence-parallel tail padding (0 without SP)."""
    step_time_s: float
    """Wall time of this rank's step() call."""
    schedule: ScheduleStats | None = None
    """This rank's schedule record: receive-buffer shapes, compute time, bytes sent, idle fraction (this rank)."""
    host_sum: dict[str, float] = field(default_factory=dict)
    """The caller's `host_values`, summed over every rank of the world (step())."""
    host_max: dict[str, float] = field(default_factory=dict)
    """The caller's `host_values`, their largest over every rank of the world."""

    @property
    def loss(self) -> float:
        """loss_t read on the host (waits for the device)."""
        return float(self.loss_t)


@dataclass
class EvalResult:
    """What one ParallelModel.evaluate() call measured (identical on every rank)."""

    loss: float
    """loss_sum / num_supervised, like the training loss (nan when nothing was supervised)."""
    loss_sum: float
    """Sum of supervised-token cross-entropies over all dp ranks and eval microbatches (fp64 accumulation)."""
    num_supervised: int
    """Global supervised tokens."""
    num_tokens: int
    """Global packed tokens of the real eval microbatches (before SP padding; fillers not counted)."""
    num_microbatches: int
    """Global real eval microbatches (dp ranks with fewer ran unsupervised fillers, not counted)."""
    eval_time_s: float
    """Wall time of this rank's evaluate() call."""


def _check_same_count(most: int, least: int) -> None:
    if most != least:
        raise ValueError(
            f"dp ranks passed different numbers of microbatches this step (between {least} and {most}); every dp "
            "rank must run the same count (FSDP reduces on the last one)"
        )


# ------------------------------------------------------------------------------------------ parallelize
def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig) -> ParallelModel:
    """Turn a single-device VLModel (any family) into this rank's share of the parallel layout (in place).

    `model` may be materialized (every rank must have built the same weights, e.g. same seed or loaded from the
    same checkpoint) or on the meta device (then call ParallelModel.materialize() and load weights). Set
    requires_grad=False on frozen parameters BEFORE calling this. Returns a ParallelModel whose modules keep
    the single-process parameter names."""
    cfg.validate()
    if (dims.pp, dims.dp, dims.tp) != (cfg.pp, dims.dp, cfg.tp) or (cfg.dp != -1 and cfg.dp != dims.dp):
        raise ValueError(
            f"ParallelDims (pp={dims.pp}, dp={dims.dp}, tp={dims.tp}) does not match the config "
            f"(pp={cfg.pp}, dp={cfg.dp}, tp={cfg.tp}); build both from the same ParallelConfig"
        )
    mcfg = model.cfg
    check_tp_divisibility(mcfg, dims.tp)
    on_meta = any(p.is_meta for p in model.parameters())
    tied = mcfg.text.tie_word_embeddings and model.lm_head is not None and (
        model.lm_head.weight is model.embed_tokens.weight
    )
    # pp * v (virtual) stages; rank r runs stages r, r + pp, ..., one model chunk each (v = 1 with '1f1b').
    v = cfg.pp_virtual_stages
    layer_ids = stage_layer_ids(mcfg, dims.pp * v, cfg.pp_first_stage_layers, cfg.pp_vision_fraction)
    stage = dims.pp_rank
    vstages = [c * dims.pp + stage for c in range(v)]
    # The later chunks are copied first (each copy holds only its own weights); the model becomes chunk 0.
    chunks = [copy_stage(model, vs, layer_ids) for vs in vstages[1:]]
    chunks.insert(0, prune_to_stage(model, vstages[0], layer_ids))
    sp = cfg.sequence_parallel and dims.tp > 1
    plain_replicated: list[str] = []
    tp_partial: list[str] = []
    rows = cfg.loss_chunk_size or DEFAULT_CHUNK_SIZE
    loss_fn = partial(lm_loss, chunk_size=rows)
    if dims.tp > 1:
        tp_mesh = dims.get_mesh("tp")
        loss_fn = make_loss_fn(tp_mesh, sp, rows)
    for vs, chunk in zip(vstages, chunks):
        if not on_meta:
            chunk.to(dims.device)  # after pruning: only this stage's weights ever reach the device whole
        if dims.tp > 1:
            partial_names = apply_tensor_parallel(chunk, tp_mesh, sp, cfg.pad_multiple(dims.tp), first_stage=vs == 0)
            tp_partial += partial_names
            plain_replicated += [n for n, p in chunk.named_parameters()
                                 if not isinstance(p, DTensor) and n not in partial_names]
        apply_activation_checkpointing(chunk, cfg)
        apply_compile(chunk, cfg)  # after TP/AC, before FSDP (parallel/compile.py)
        apply_fsdp(chunk, dims.get_mesh("dp"), cfg)
    pm = ParallelModel(chunks, dims, cfg, stage=stage, virtual_stages=vstages, layer_ids=layer_ids,
                       tied_across_stages=tied and dims.pp > 1, plain_replicated=plain_replicated,
                       tp_partial=tp_partial,
                       sequence_parallel=sp, loss_fn=loss_fn)
    if not on_meta:
        pm.sync_tied_weights()
    return pm


# ------------------------------------------------------------------------------------------ ParallelModel
class ParallelModel:
    """This rank's stage of the model, sharded over tp and dp, and the step that trains it."""

    def __init__(self, modules: list[nn.Module], dims: ParallelDims, cfg: ParallelConfig, *, stage: int,
                 virtual_stages: list[int], layer_ids: list[list[int]], tied_across_stages: bool,
                 plain_replicated: list[str], sequence_parallel: bool, loss_fn: Callable,
                 tp_partial: list[str] | None = None) -> None:
        self.modules: list[nn.Module] = list(modules)
        """This rank's model chunks, one per virtual stage (one with '1f1b'); parameter names equal the
        single-process model's (train/state.py merges several for the optimizer state)."""
        self.dims, self.cfg = dims, cfg
        self.stage, self.layer_ids = stage, layer_ids
        self.virtual_stages = list(virtual_stages)
        """The virtual stage of each chunk: chunk c runs stage c * pp + pp_rank of layer_ids."""
        self.num_virtual_stages = len(layer_ids)
        self.sequence_parallel = sequence_parallel
        self.loss_fn = loss_fn
        """loss_fn(final hidden states, head weight, labels) -> (loss_sum, n): model.loss.lm_loss, or its
        vocab-parallel form under tp (parallel/vocab_parallel.py). The model returns hidden states; the engine
        composes the loss (on the last stage, right after the stage's forward, inside the same FSDP step)."""
        self.tied_across_stages = tied_across_stages
        self.plain_replicated = plain_replicated
        """Plain (non-DTensor) weights every tp rank computes redundantly: gradients averaged over tp."""
        self.tp_partial = list(tp_partial or [])
        """Plain weights applied to each tp rank's own heads (QK-norm): gradients are partial sums, summed over tp."""
        self.hidden_size = self.modules[0].cfg.text.hidden_size
        self.compute_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        self.steps = 0
        self._tie_group = self._make_tie_group() if tied_across_stages else None
        pp_group = dims.get_group("pp") if dims.pp > 1 else None
        self.executor = PipelineExecutor(
            schedule=cfg.pp_schedule, stage=stage, num_stages=dims.pp, num_chunks=len(self.modules), group=pp_group,
            stage_ranks=[dims.stage_rank(s) for s in range(dims.pp)] if pp_group is not None else [],
            timeout=dims.timeout, device=dims.device,
        )

    @property
    def module(self) -> nn.Module:
        """The first (with '1f1b' the only) model chunk of this rank."""
        return self.modules[0]

    def reshard(self) -> None:
        """Put every FSDP unit back to its sharded parameters. step() ends sharded; a forward run outside
        step() (e.g. an eval under no_grad) leaves ZeRO-1 units unsharded until this is called."""
        for m in self.modules:
            for sub in m.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()

    # ---------------------------------------------------------------- parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(single-process FQN, parameter) of this rank's stage: trainable and frozen, each once."""
        seen: set[int] = set()
        for m in self.modules:
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (sharded DTensors), trainable and frozen; group them by FQN for the optimizer
        (named_parameters) and give it only those with requires_grad."""
        for _, p in self.named_parameters():
            yield p

    # ---------------------------------------------------------------- meta-device path
    @torch.no_grad()
    def materialize(self, device: torch.device | str | None = None, init_weights: bool = True) -> None:
        """For a model parallelized on the meta device: allocate this rank's shards on `device` (default: the
        mesh device), recompute the rotary buffers, and (init_weights) run the model's init. Load real
        weights afterwards with load_state_dict (or DCP)."""
        device = torch.device(device) if device is not None else self.dims.device
        for m in self.modules:
            m.to_empty(device=device)
            if init_weights:
                m.init_weights()
            # Non-persistent rotary buffers: neither to_empty nor checkpoints carry them.
            m.init_buffers(device)
        self.sync_tied_weights()

    # ---------------------------------------------------------------- step
    def prepare(self, microbatches: list[PackedBatch] | None) -> list[PackedBatch] | None:
        """Stage 0's microbatches made ready on the HOST, before their copy to the device: the supervised positions
        (the loss takes them instead of searching the labels on the device) and the model's host-built inputs
        (VLModel.host_inputs: the ViT's plan, the placeholder counts). With them the step reads nothing back from
        the device. The training loop calls it before its prefetcher's copy; step() prepares what was not."""
        if microbatches is None or self.stage != 0:
            return microbatches
        return [self._prepare_one(mb) for mb in microbatches]

    def _prepare_one(self, mb: PackedBatch) -> PackedBatch:
        if not isinstance(mb, PackedBatch) or mb.supervised_idx is not None or mb.input_ids.device.type != "cpu":
            return mb  # prepared already, or on the device already (the model then finds what it needs itself)
        model = self.modules[0]
        return dataclasses.replace(
            mb, supervised_idx=supervised_positions(mb.labels, model.cfg.text.vocab_size),
            prepared=model.host_inputs(mb.input_ids, mb.image_grid_thw, mb.video_grid_thw),
        )

    def _stage0_batches(self, microbatches: list[PackedBatch] | None,
                        num_real: int | None = None) -> list[tuple[PackedBatch, int, int]] | None:
        """(device, SP-padded microbatch, real length, supervised count) on stage 0; entries from num_real on are
        fillers (length 0 in the counts). The supervised count is read from the host batch, before the copy: on a
        GPU, counting device labels would block the host once per microbatch."""
        if self.stage != 0:
            return None
        if not microbatches:
            raise ValueError(
                f"rank {dist.get_rank()} is pipeline stage 0 and needs the step's microbatches, got "
                f"{microbatches!r}; only stages > 0 may pass None"
            )
        out = []
        for i, mb in enumerate(microbatches):
            if not isinstance(mb, PackedBatch):
                raise ValueError(f"microbatch {i} is a {type(mb).__name__}, expected core.batch.PackedBatch")
            mb = self._prepare_one(mb)
            n_sup = mb.num_supervised
            mb = mb.to(self.dims.device, non_blocking=True)
            real = mb.num_tokens if num_real is None or i < num_real else 0
            if self.sequence_parallel:
                mb = pad_microbatch(mb, self.cfg.pad_multiple(self.dims.tp))
            out.append((mb, real, n_sup))
        return out

    def _metas(self, batches: list[tuple[PackedBatch, int, int]] | None) -> list[MicrobatchMeta]:
        """Every microbatch's lengths and small tensors on every stage (one broadcast from stage 0 when pp > 1)."""
        dims = self.dims
        if dims.pp > 1:
            return broadcast_step_metadata(batches, src=dims.stage_rank(0), group=dims.get_group("pp"),
                                           device=dims.device)
        return metas_from_batches(batches)

    def _global_counts(self, metas: list[MicrobatchMeta]) -> tuple[int, int, int, int]:
        """Global (supervised, real tokens, padding tokens, real microbatches) by a device all-reduce over dp
        (evaluate()); raises when dp ranks' counts differ."""
        dev = self.dims.device
        m = len(metas)
        sums = torch.tensor(
            [sum(x.num_supervised for x in metas), sum(x.num_real_tokens for x in metas),
             sum(x.num_tokens - x.num_real_tokens for x in metas), sum(x.num_real_tokens > 0 for x in metas)],
            dtype=torch.long, device=dev,
        )
        mm = torch.tensor([m, -m], dtype=torch.long, device=dev)
        dp_group = self.dims.get_group("dp")
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(mm, op=dist.ReduceOp.MAX, group=dp_group)
        n_sup, n_tok, n_pad, n_mb, most, neg_least = torch.cat([sums, mm]).tolist()  # one host read
        _check_same_count(most, -neg_least)
        return n_sup, n_tok, n_pad, n_mb

    _COUNTS = ("exhausted", "reporter", "microbatches", "supervised", "tokens", "padding", "real_microbatches")

    def _exchange(self, microbatches: list[PackedBatch] | None, exhausted: bool,
                  host_values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """The step's one exchange of host values over the world, on a CPU group (ParallelDims.host_group; the
        default group on CPU): whether any rank is out of data, stage 0's global counts (each dp replica's
        tp rank 0 reports), the caller's values. Nothing in it waits for the device. Returns (sums, maxima) by
        name; the microbatch counts of the reporters must agree (else a ValueError on every rank)."""
        dims = self.dims
        reporter = self.stage == 0 and dims.tp_rank == 0 and not exhausted
        mbs = list(microbatches or []) if reporter else []
        mult = self.cfg.pad_multiple(dims.tp) if self.sequence_parallel else 1
        own = [float(exhausted), float(reporter), float(len(mbs)),
               float(sum(mb.num_supervised for mb in mbs)), float(sum(mb.num_tokens for mb in mbs)),
               float(sum(-mb.num_tokens % mult for mb in mbs)), float(sum(mb.num_tokens > 0 for mb in mbs)),
               *(float(v) for v in host_values.values())]
        group = dims.host_group
        world = dist.get_world_size(group)
        mine = torch.tensor(own, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine, group=group)
        table = torch.stack(rows)
        names = [*self._COUNTS, *host_values]
        sums, maxima = dict(zip(names, table.sum(0).tolist())), dict(zip(names, table.max(0).values.tolist()))
        if not sums["exhausted"]:
            counts = [int(r[2]) for r in table.tolist() if r[1]]
            _check_same_count(max(counts, default=0), min(counts, default=0))
        return sums, maxima

    def host_max(self, values: list[float]) -> list[float]:
        """The largest of each host value over the world, on the CPU group (never waits for the device)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dims.host_group)
        return t.tolist()

    def step(self, microbatches: list[PackedBatch] | None, *, exhausted: bool = False,
             host_values: Mapping[str, float] | None = None) -> StepResult | None:
        """Forward + backward over the step's microbatches (this dp rank's share); gradients are reduced and
        ready on return. Pipeline stages > 0 pass None (stage 0 broadcasts what they need).

        The step's host values travel in one exchange before any compute (_exchange): `exhausted` (this rank
        has no more data: every rank returns None, nothing runs) and `host_values` (the caller's numbers,
        returned summed and maximized over the world in host_sum / host_max). Nothing inside the step reads
        the device back when the microbatches were prepared on the host (prepare()), except the pipeline's
        length broadcast when pp > 1; the loss stays on the device (StepResult.loss_t)."""
        t0 = time.perf_counter()
        cfg, dims = self.cfg, self.dims
        sums, maxima = self._exchange(microbatches, exhausted, host_values or {})
        if sums["exhausted"]:
            return None
        if cfg.check_replicated_every and self.steps % cfg.check_replicated_every == 0:
            self.check_replicated()
        batches = self._stage0_batches(microbatches)
        if batches is not None and dims.tp > 1 and cfg.check_replicated_every and (
            (self.steps % cfg.check_replicated_every) == 0
        ):
            self._check_tp_inputs(batches)
        metas = self._metas(batches)
        n_sup, n_tok, n_pad, n_mb = (int(sums[k]) for k in ("supervised", "tokens", "padding", "real_microbatches"))
        m = len(metas)
        self.executor.check_microbatches(m)  # every rank knows m here: all raise alike
        inv_count = 1.0 / max(n_sup, 1)

        def before_backward(c: int, i: int) -> None:
            # Each chunk is an FSDP root: it reduces its gradients at its own last backward (microbatch m - 1).
            set_microbatch_flags(self.modules[c], last=(i == m - 1), zero_stage=cfg.zero_stage)

        loss_acc, stats = self._run_schedule(batches, metas, inv_count, before_backward)
        self._post_backward()
        loss_sum = self._global_loss(loss_acc)
        self.steps += 1
        n_caller = len(self._COUNTS)
        return StepResult(
            loss_t=loss_sum * inv_count, num_tokens=n_tok, num_supervised=n_sup,
            num_microbatches=n_mb, padded_tokens=n_pad, step_time_s=time.perf_counter() - t0, schedule=stats,
            host_sum=dict(list(sums.items())[n_caller:]), host_max=dict(list(maxima.items())[n_caller:]),
        )

    def _run_schedule(self, batches: list[tuple[PackedBatch, int]] | None, metas: list[MicrobatchMeta],
                      scale: float, before_backward: Callable[[int, int], None],
                      forward_only: bool = False) -> tuple[torch.Tensor, ScheduleStats]:
        """Run this rank's pipeline program (plain accumulation with pp = 1); returns this rank's sum of token
        cross-entropies (fp64, nonzero on the last stage only) and its schedule record. The last stage
        backpropagates loss_sum * scale."""
        dims = self.dims
        last_vs = self.num_virtual_stages - 1
        loss_acc = torch.zeros((), dtype=torch.float64, device=dims.device)

        def forward_fn(c: int, i: int, x: torch.Tensor | None) -> torch.Tensor:
            nonlocal loss_acc
            meta, module, vs = metas[i], self.modules[c], self.virtual_stages[c]
            if vs == 0:
                kwargs = batches[i][0].model_inputs()
            else:
                kwargs = {"hidden_states": x, "position_ids": meta.position_ids, "cu_seqlens": meta.cu_seqlens,
                          "max_seqlen": meta.max_seqlen}
            out = module(**kwargs)
            if vs == last_vs:
                loss_sum, _ = self.loss_fn(out, module.lm_head.weight, meta.labels,
                                           supervised_idx=meta.supervised_idx)
                loss_acc = loss_acc + loss_sum.detach().double()
                return loss_sum * scale
            if isinstance(out, DTensor):
                out = out.to_local()
            return out.contiguous()

        def act_shape(i: int) -> tuple[int, int]:
            T = metas[i].num_tokens
            return (T // dims.tp if self.sequence_parallel else T, self.hidden_size)

        stats = self.executor.run(len(metas), forward_fn, before_backward, act_shape, self.compute_dtype,
                                  forward_only=forward_only)
        return loss_acc, stats

    def _global_loss(self, loss_acc: torch.Tensor) -> torch.Tensor:
        """Sum of this step's token CE over the world (fp64, on the device): the last stage's tp-rank-0 ranks hold
        one share per dp rank; one world all-reduce sums them."""
        dims = self.dims
        contrib = loss_acc if (self.stage == dims.pp - 1 and dims.tp_rank == 0) else torch.zeros_like(loss_acc)
        dist.all_reduce(contrib)
        return contrib

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, microbatches: list[PackedBatch] | None) -> EvalResult:
        """Forward-only loss over this dp rank's eval microbatches through the training layout (the pipeline
        schedule without backwards, TP/SP, FSDP all-gathers; no gradients, no gradient sync). FSDP units are
        resharded afterwards. Normalized like the training loss: token CE summed over all dp ranks / their
        global supervised count.

        Every rank of the world calls it together; pipeline stages > 0 pass None. dp ranks may pass different
        counts, or none ([] or None): one all-reduce tells every rank the largest, ranks with fewer run
        one-token unsupervised fillers up to it (with 'interleaved_1f1b', up to the next multiple of pp), so
        every rank runs the same collectives and none waits on another."""
        t0 = time.perf_counter()
        dims = self.dims
        own = list(microbatches or []) if self.stage == 0 else []
        count = torch.tensor([len(own)], dtype=torch.long, device=dims.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        m = int(count.item())
        if self.cfg.pp_schedule == "interleaved_1f1b":
            m = -(-m // dims.pp) * dims.pp
        if m == 0:
            return EvalResult(loss=float("nan"), loss_sum=0.0, num_supervised=0, num_tokens=0, num_microbatches=0,
                              eval_time_s=time.perf_counter() - t0)
        batches = None
        if self.stage == 0:
            batches = self._stage0_batches(own + [_filler_microbatch() for _ in range(m - len(own))], len(own))
        metas = self._metas(batches)
        n_sup, n_tok, _, n_mb = self._global_counts(metas)
        loss_acc, _ = self._run_schedule(batches, metas, 1.0, _no_backward, forward_only=True)
        self.reshard()
        loss_sum = float(self._global_loss(loss_acc))
        return EvalResult(
            loss=loss_sum / n_sup if n_sup else float("nan"), loss_sum=loss_sum, num_supervised=n_sup,
            num_tokens=n_tok, num_microbatches=n_mb, eval_time_s=time.perf_counter() - t0,
        )

    def _check_tp_inputs(self, batches: list[tuple[PackedBatch, int]]) -> None:
        """Debug: every tp rank must be fed the same microbatches (the loader shards by dp rank only)."""
        ids = [mb.input_ids.reshape(-1) for mb, *_ in batches]
        fp = torch.tensor([len(ids), sum(int(x.numel()) for x in ids), sum(int(x.sum()) for x in ids),
                           sum(mb.num_patches for mb, *_ in batches)], dtype=torch.long, device=self.dims.device)
        group = self.dims.get_group("tp")
        gathered = [torch.empty_like(fp) for _ in range(self.dims.tp)]
        dist.all_gather(gathered, fp, group=group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(
                "tp ranks of one dp replica were given different microbatches (count, tokens, id sum, patches): "
                f"{[g.tolist() for g in gathered]}; feed every tp rank its dp rank's microbatches"
            )

    # ---------------------------------------------------------------- gradient sync
    def _tied_param(self) -> nn.Parameter | None:
        if not self.tied_across_stages:
            return None
        if self.stage == 0:
            return self.modules[0].embed_tokens.weight  # virtual stage 0
        return self.modules[-1].lm_head.weight if self.stage == self.dims.pp - 1 else None

    def _make_tie_group(self) -> dist.ProcessGroup | None:
        """A 2-rank group {stage 0, last stage} per (dp, tp) coordinate (Megatron's embedding group)."""
        first, last = self.dims.stage_rank(0), self.dims.stage_rank(self.dims.pp - 1)
        if dist.get_rank() not in (first, last):
            return None
        return dist.new_group([first, last], timeout=self.dims.timeout, use_local_synchronization=True)

    def _post_backward(self) -> None:
        tied = self._tied_param()
        if tied is not None and tied.requires_grad:
            if tied.grad is None:
                tied.grad = torch.zeros_like(tied)
            dist.all_reduce(_local(tied.grad), group=self._tie_group)
        if self.plain_replicated or self.tp_partial:
            params = dict(self.named_parameters())
            for names, divide in ((self.plain_replicated, True), (self.tp_partial, False)):
                grads = [_local(params[n].grad) for n in names if params[n].grad is not None]
                if grads:
                    flat = _flatten_dense_tensors(grads)
                    dist.all_reduce(flat, group=self.dims.get_group("tp"))
                    if divide:
                        flat.div_(self.dims.tp)
                    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                        g.copy_(synced)

    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Make the last stage's copy of the tied embedding equal stage 0's (after init / materialize)."""
        tied = self._tied_param()
        if tied is not None:
            dist.broadcast(_local(tied), src=self.dims.stage_rank(0), group=self._tie_group)

    # ---------------------------------------------------------------- clipping
    def _counts_once(self, name: str, p: torch.Tensor) -> bool:
        """Whether this rank's shard of `p` is counted in the global norm (replicas are counted once)."""
        if self.tied_across_stages and self.stage == self.dims.pp - 1 and p is self._tied_param():
            return False  # the last stage's copy of the tied embedding: the same logical weight as stage 0's
        return not (self.dims.tp > 1 and self.dims.tp_rank != 0 and _tp_replicated(p))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients by their global L2 norm over pp, dp and tp; returns the (fp32) norm before clipping.

        Replicated shards (tp-replicated weights, the pipeline-tied head copy) are counted once. With
        max_norm <= 0 nothing is scaled. A non-finite norm (inf/nan) is returned and nothing is scaled: the
        caller should skip the optimizer step."""
        grads, counted = [], []
        for name, p in self.named_parameters():
            if p.grad is None:
                continue
            g = _local(p.grad)
            grads.append(g)
            if self._counts_once(name, p) and g.numel():
                counted.append(g)
        sq = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        if counted:
            norms = torch._foreach_norm(counted, 2.0, dtype=torch.float32)
            sq = torch.stack(norms).pow(2).sum()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm > 0 and grads:
            # A non-finite norm scales by 1 (nothing): decided on the device, no host read inside the step.
            coef = torch.where(torch.isfinite(norm), (max_norm / (norm + 1e-6)).clamp(max=1.0), 1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return norm

    # ---------------------------------------------------------------- replicated-weights check
    def _replicated_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if _tp_replicated(p)]

    @torch.no_grad()
    def check_replicated(self) -> None:
        """Raise RuntimeError (on every rank) unless weights replicated over tp are bitwise equal across the tp
        ranks and the pipeline-tied embedding copies are bitwise equal across first and last stage."""
        self.reshard()
        errors: list[str] = []
        if self.dims.tp > 1:
            params = dict(self.named_parameters())
            names = self._replicated_names()
            errors += _compare_across(names, [_local(params[n]) for n in names], self.dims.get_group("tp"), "tp")
        tied = self._tied_param()
        if tied is not None:
            errors += _compare_across(["tied embedding/lm_head"], [_local(tied)], self._tie_group, "pp tie")
        if errors:
            raise RuntimeError("replicated weights diverged: " + "; ".join(errors))

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's stage state dict: single-process FQNs, values are DTensors (sharded over dp and tp), so
        torch.distributed.checkpoint saves/loads it and reshards across layouts."""
        self.reshard()
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            out.update(m.state_dict())
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load values into this rank's stage. Values may be DTensors of this layout (e.g. after dcp.load into
        state_dict()), DTensors of another layout, or plain full tensors (e.g. a single-process or HF-converted
        state dict held on every rank). Keys of other pipeline stages are ignored; with strict, every key of
        this stage must be present."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        if strict and missing:
            raise ValueError(f"state dict is missing {len(missing)} keys of pipeline stage {self.stage}: {missing[:8]}")
        for k, dst in own.items():
            if k not in state_dict:
                continue
            src = state_dict[k]
            if src is dst:
                continue
            if isinstance(dst, DTensor):
                if isinstance(src, DTensor) and src.device_mesh == dst.device_mesh and src.placements == dst.placements:
                    dst.copy_(src)
                    continue
                full = src.full_tensor() if isinstance(src, DTensor) else src
                if tuple(full.shape) != tuple(dst.shape):
                    raise ValueError(f"{k}: shape {tuple(full.shape)} in the state dict, {tuple(dst.shape)} here")
                shard = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements,
                                          src_data_rank=None)
                dst.to_local().copy_(shard.to_local())
            else:
                dst.copy_(src.full_tensor() if isinstance(src, DTensor) else src)
        self.sync_tied_weights()


# ------------------------------------------------------------------------------------------ helpers
def _filler_microbatch() -> PackedBatch:
    """One unsupervised token: what a dp rank with fewer eval microbatches runs, so all run as many."""
    return PackedBatch(input_ids=torch.zeros(1, dtype=torch.long), labels=torch.full((1,), IGNORE_INDEX),
                       position_ids=torch.zeros(3, 1, dtype=torch.long),
                       cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1)


def _no_backward(chunk: int, i: int) -> None:
    raise AssertionError("a forward-only schedule ran a backward")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _tp_replicated(p: torch.Tensor) -> bool:
    """Whether a (FSDP/TP) parameter is held whole on every tp rank (no tp dimension, or Replicate on it)."""
    if not isinstance(p, DTensor):
        return True
    names = p.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return True
    return p.placements[names.index("tp")].is_replicate()


def _compare_across(names: list[str], tensors: list[torch.Tensor], group, what: str) -> list[str]:
    """Gather each tensor's bits over `group`; names of those that differ from the group's first rank."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    errors, off = [], 0
    for name, t in zip(names, tensors):
        n = t.numel()
        ref = gathered[0][off : off + n]
        for r, other in enumerate(gathered[1:], start=1):
            o = other[off : off + n]
            if not torch.equal(ref.view(torch.int32), o.view(torch.int32)):
                errors.append(f"{name} differs across {what} ranks 0 and {r} (max abs diff "
                              f"{(ref - o).abs().max().item():.3e})")
        off += n
    return errors
