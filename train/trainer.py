"""The train loop of one stage: build, (resume | init_from), step, log, checkpoint.

    python -m train RECIPE.yaml [dotted.key=value ...]

One optimizer step:
  1. every first-stage rank takes its dp rank's share of the global batch from the loader
     (train.global_microbatches / dp packed microbatches) and times the wait;
  2. the engine runs forward + backward over them (1F1B across pipeline stages, TP/SP inside, FSDP2 over dp),
     with the loss normalized by the GLOBAL supervised-token count of the step;
  3. the global gradient norm is computed (over every parallel group) and clipped;
  4. a non-finite loss or norm on any rank skips the update on all ranks (counted; too many -> stop);
  5. AdamW steps with the LR of the step (a pure function of the step: warmup + cosine);
  6. metrics are reduced and written by rank 0; a checkpoint is saved every checkpoint.every steps.

Resume ("auto"): the latest complete checkpoint of checkpoint.dir restores weights, optimizer, step counters,
RNG states and each dp rank's loader position, so the resumed run continues bitwise where the saved one was
(same layout). Under a different layout, weights and optimizer state reshard (DCP); loader positions are
restored when the dp size is unchanged, otherwise the loader restarts its stream (see docs/train.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.loader import build_loader
from model.flops import batch_flops
from model.qwen2_vl import Qwen2VL
from parallel import init_distributed, parallelize
from train.cfgparse import ConfigError
from train.checkpoint import (
    CheckpointManager,
    Layout,
    checkpoint_keys,
    from_bytes,
    latest_complete,
    list_complete,
    read_meta,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    to_bytes,
)
from train.config import JobConfig
from train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from train.optim import apply_freeze, build_optimizer, init_optimizer_state, optimizer_state_tensors, set_lr
from train.weights import (
    describe_init,
    is_hf_dir,
    load_checkpoint_weights,
    load_hf_weights,
    meta_model,
    resolve_model_config,
)

log = logging.getLogger(__name__)

# Random init happens on the full model (then sharded) up to this size, else shard by shard.
FULL_INIT_MAX_BYTES = 2 * 2**30
# A new pass over the data (after a dp-size change) reseeds the loader by this much per pass.
DATA_PASS_SEED_STRIDE = 1_000_003
# model.flops names the vision group 'vit'.
_FLOPS_GROUP = {"vision": "vit", "merger": "merger", "llm": "llm"}


class TrainingStopped(RuntimeError):
    """Training cannot continue (diverged, data exhausted before any step): the message says why and what to do."""


@dataclass
class TrainResult:
    """What a finished stage hands back (and the demo prints)."""

    run_dir: Path
    final_step: int
    final_loss: float | None
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    stop_reason: str = "completed"


def microbatches_per_rank(cfg: JobConfig, dp: int) -> int:
    """Per-dp-rank microbatches per step from train.global_microbatches (or parallel.num_microbatches)."""
    g = cfg.train.global_microbatches
    if g is None:
        return cfg.parallel.num_microbatches
    if g % dp:
        raise ConfigError(
            f"train.global_microbatches={g} is not divisible by dp={dp}: choose a multiple of {dp} (the global batch "
            "is split evenly over data-parallel ranks)"
        )
    return g // dp


class Trainer:
    """Builds everything for one stage; `train()` runs it. All ranks construct one."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dims = init_distributed(cfg.parallel)
        d = self.dims
        self.layout = Layout(
            dp=d.dp, tp=d.tp, pp=d.pp, dp_rank=d.dp_rank, tp_rank=d.tp_rank, pp_rank=d.pp_rank,
            rank=dist.get_rank(), world=dist.get_world_size(),
        )
        self.device = d.device
        self.is_main = self.layout.rank == 0
        self.m = microbatches_per_rank(cfg, d.dp)
        if cfg.parallel.num_microbatches != self.m and cfg.train.global_microbatches is not None:
            cfg.parallel.num_microbatches = self.m  # the engine reads it (pipeline schedule length)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.run_dir)
        # A separate gloo group for checkpoint collectives: async saves run them from a background thread,
        # which must not interleave with the training collectives of the default group.
        self.ckpt_pg = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
        self.ckpt = CheckpointManager(
            cfg.checkpoint_dir, self.layout, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, self.ckpt_pg
        )
        self.resume_path = self._find_resume()
        self.mcfg = resolve_model_config(cfg.model, self.resume_path)

        # ---- model: build, freeze (before the engine wraps it), parallelize, materialize
        # Weights that will be loaded (resume, init_from) are built on the meta device and only this rank's
        # shards are ever allocated. A random init of a model that fits in host memory happens in full, seeded,
        # before sharding: every rank and every layout then starts from the same weights (losses comparable
        # across layouts). Bigger models initialize their shards in place (the init then depends on the layout).
        torch.manual_seed(cfg.train.seed)
        loading = self.resume_path is not None or cfg.model.init_from is not None
        model = meta_model(self.mcfg)
        n_params = sum(p.numel() for p in model.parameters())
        full_init = not loading and n_params * 4 <= FULL_INIT_MAX_BYTES
        if full_init:
            model = Qwen2VL(self.mcfg)
        self.trainable_counts = apply_freeze(model.named_parameters(), cfg.frozen_groups)
        self.engine = parallelize(model, self.dims, cfg.parallel)
        if not full_init:
            self.engine.materialize(init_weights=not loading)
        apply_freeze(self.engine.named_parameters(), cfg.frozen_groups)
        self.optimizer = build_optimizer(list(self.engine.named_parameters()), cfg)
        if self.optimizer is not None:
            init_optimizer_state(self.optimizer)
        self.trainable_groups = [g for g in ("vision", "merger", "llm") if g not in cfg.frozen_groups]

        # ---- counters (checkpointed)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.data_pass = 0  # bumped when the loader cannot continue its position (dp size changed)
        restore_data = False
        if self.resume_path is not None:
            restore_data = self._peek_trainer_state(self.resume_path)

        # ---- data: only the first pipeline stage consumes microbatches (tp peers get identical ones)
        self.loader = None
        if self.layout.has_data:
            data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + DATA_PASS_SEED_STRIDE * self.data_pass)
            self.loader = build_loader(data_cfg, d.dp_rank, d.dp)
        self._it = None

        resumed_from = None
        self._saved_step = 0
        if self.resume_path is not None:
            self._load_resume(self.resume_path, restore_data)
            resumed_from = self.step
            self._saved_step = self.step
        elif cfg.model.init_from is not None:
            self._load_init(cfg.model.init_from)
        self.metrics = MetricsLogger(cfg, self.is_main, resumed_from=resumed_from)
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self._stop_signal: int | None = None
        if self.is_main:
            cfg.save(self.run_dir / "config.yaml")
        self.metrics.event(
            "start", step=self.step, layout=self.layout.describe(), stage=cfg.train.stage,
            frozen=list(cfg.frozen_groups), trainable_params=self.trainable_counts,
            resumed_from=str(self.resume_path) if self.resume_path else None, init_from=cfg.model.init_from,
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), data_pass=self.data_pass,
            microbatches_per_rank=self.m,
        )

    # ------------------------------------------------------------------------------------ resume / init
    def _find_resume(self) -> Path | None:
        r = self.cfg.checkpoint.resume
        if r == "never":
            existing = list_complete(self.cfg.checkpoint_dir)
            if existing:
                raise ConfigError(
                    f"checkpoint.resume=never but {self.cfg.checkpoint_dir} already holds {existing[-1].name}: "
                    "use a new run_dir / checkpoint.dir, or checkpoint.resume=auto to continue it"
                )
            return None
        if r == "auto":
            return latest_complete(self.cfg.checkpoint_dir)
        return resolve_checkpoint(r)

    def _model_state(self) -> dict[str, torch.Tensor]:
        return dict(self.engine.state_dict())

    def _load_init(self, src: str) -> None:
        sd = self._model_state()
        if is_hf_dir(src):
            load_hf_weights(sd, src, self.mcfg)
        else:
            load_checkpoint_weights(sd, src)
        self.engine.load_state_dict(sd)
        if self.is_main:
            log.info("initialized weights from %s", describe_init(src))

    def _trainer_state_template(self) -> dict[str, int]:
        return {"step": 0, "skipped_steps": 0, "consecutive_skips": 0, "tokens_seen": 0, "samples_seen": 0,
                "data_pass": 0}

    def _peek_trainer_state(self, path: Path) -> bool:
        """Read the checkpoint's counters (before the loader is built); return whether the loader position
        can be restored (same dp size and checkpoint.data_state='exact')."""
        keys = checkpoint_keys(path)
        state = {"trainer": {k: 0 for k in self._trainer_state_template() if f"trainer.{k}" in keys}}
        self.ckpt.load(path, state)
        t = state["trainer"]
        self.data_pass = int(t.get("data_pass", 0))
        saved_dp = read_meta(path)["layout"]["dp"]
        restore = saved_dp == self.layout.dp and self.cfg.checkpoint.data_state == "exact"
        if not restore:
            self.data_pass += 1
            if self.is_main:
                why = (f"the dp size changed ({saved_dp} -> {self.layout.dp}): a loader position is per dp rank and "
                       "cannot be mapped to another dp size" if saved_dp != self.layout.dp
                       else "checkpoint.data_state=restart")
                log.warning("resuming %s: %s; the data continues with a new pass, reseeded (data pass %d)",
                            path, why, self.data_pass)
        return restore

    def _load_resume(self, path: Path, restore_data: bool) -> None:
        meta = read_meta(path)
        keys = checkpoint_keys(path)
        saved = meta["layout"]
        same_dp = saved["dp"] == self.layout.dp
        same_layout = same_dp and saved["tp"] == self.layout.tp and saved["pp"] == self.layout.pp
        model_sd = self._model_state()
        optim_sd = optimizer_state_tensors(self.optimizer)
        state: dict[str, Any] = {f"model.{k}": v for k, v in model_sd.items()}
        state.update({f"optim.{k}": v for k, v in optim_sd.items()})
        if self.mcfg.text.tie_word_embeddings:
            # Tied embeddings: one process (or pp=1) has ONE parameter, named embed_tokens.weight; a pipeline's
            # last stage holds its own copy as lm_head.weight (kept equal by the engine). A checkpoint of the
            # former has no optimizer state under lm_head.weight: the copy takes the embedding's.
            for k in [k for k in state if k.startswith("optim.lm_head.weight.") and k not in keys]:
                alias = k.replace("optim.lm_head.weight.", "optim.embed_tokens.weight.", 1)
                if alias in keys and alias not in state:
                    state[alias] = state.pop(k)
        absent = [k for k in state if k not in keys]
        if absent:
            raise ConfigError(
                f"checkpoint {path} has no {absent[0]} (and {len(absent) - 1} more): it was saved with other "
                "trainable groups or another model. To start a new stage from its weights, use model.init_from "
                "with checkpoint.resume=never in a new run_dir."
            )
        state["trainer"] = {k: v for k, v in self._trainer_state_template().items() if f"trainer.{k}" in keys}
        loader_key = f"loader.dp{self.layout.dp_rank}"
        if self.loader is not None and restore_data:
            if loader_key not in keys:
                raise ConfigError(f"checkpoint {path} has no loader state for dp rank {self.layout.dp_rank}")
            state[loader_key] = None
        rng_key = f"rng.rank{self.layout.rank}"
        if same_layout and rng_key in keys:
            state[rng_key] = None
        self.ckpt.load(path, state)
        self.engine.load_state_dict(model_sd)
        t = state["trainer"]
        self.step, self.skipped_steps = int(t["step"]), int(t["skipped_steps"])
        self.consecutive_skips, self.tokens_seen = int(t["consecutive_skips"]), int(t["tokens_seen"])
        self.samples_seen = int(t["samples_seen"])
        if self.loader is not None and loader_key in state:
            try:
                self.loader.load_state_dict(from_bytes(state[loader_key]))
            except ValueError as e:
                raise ConfigError(
                    f"cannot restore the data position from {path}: {e} (to continue with a new, reseeded pass "
                    "over the data instead, set checkpoint.data_state=restart)"
                ) from e
        if rng_key in state:
            set_rng_state(from_bytes(state[rng_key]))
        if self.is_main:
            log.info("resumed from %s at step %d (saved as %s)", path, self.step, saved)

    def _checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"model.{k}": v for k, v in self._model_state().items()}
        state.update({f"optim.{k}": v for k, v in optimizer_state_tensors(self.optimizer).items()})
        state["trainer"] = {
            "step": self.step, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
            "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen, "data_pass": self.data_pass,
        }
        if self.loader is not None and self.layout.tp_rank == 0:
            state[f"loader.dp{self.layout.dp_rank}"] = to_bytes(self.loader.state_dict())
        state[f"rng.rank{self.layout.rank}"] = to_bytes(rng_state())
        return state

    def save(self) -> None:
        meta = {"model_config": self.mcfg.to_hf_dict(), "stage": self.cfg.train.stage,
                "frozen": list(self.cfg.frozen_groups), "tokens_seen": self.tokens_seen}
        self.ckpt.save(self.step, self._checkpoint_state(), self.cfg.to_yaml(), meta)
        self._saved_step = self.step
        self.metrics.event("checkpoint", step=self.step, seconds=round(self.ckpt.save_seconds, 3),
                           path=str(self.ckpt.dir / f"step_{self.step:08d}"))

    # ------------------------------------------------------------------------------------ loop
    def _next_microbatches(self) -> list | None:
        if self.loader is None:
            return None
        if self._it is None:
            self._it = iter(self.loader)
        out = []
        for _ in range(self.m):
            try:
                out.append(next(self._it))
            except StopIteration:
                return None
        return out

    def _zero_grad(self) -> None:
        for _, p in self.engine.named_parameters():
            p.grad = None

    def _allreduce(self, values: list[float], op: dist.ReduceOp) -> list[float]:
        # On the training device: the default group is NCCL on GPUs, which takes CUDA tensors only.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self._stop_signal = signum

        self._prev_handlers = {}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. embedded use): no handler
                self._prev_handlers[s] = signal.signal(s, handler)

    def train(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.train.steps
        self._install_signal_handlers()
        losses: list[float] = []
        last_loss: float | None = None
        stop_reason = "completed"
        first_stage_reporter = self.layout.pp_rank == 0 and self.layout.tp_rank == 0
        try:
            while self.step < total:
                self.ckpt.poll()
                lrs = set_lr(self.optimizer, self.step, cfg)
                t0 = time.perf_counter()
                mbs = self._next_microbatches()
                t_data = time.perf_counter() - t0
                # Every rank must agree before the engine runs: a first-stage rank out of data stops all.
                (exhausted,) = self._allreduce([float(self.layout.has_data and mbs is None)], dist.ReduceOp.MAX)
                if exhausted:
                    stop_reason = "data_exhausted"
                    if self.is_main:
                        log.warning("data exhausted at step %d of %d (data.epochs=%s)", self.step, total,
                                    cfg.data.epochs)
                    break
                res = self.engine.step(mbs)
                # max_norm 0 = measure only (the engine scales nothing), so grad_clip: 0 disables clipping.
                gnorm = float(self.engine.clip_grad_norm_(cfg.optim.grad_clip))
                loss = float(res.loss)
                nonfinite_local = float(not (math.isfinite(loss) and math.isfinite(gnorm)))
                mem = peak_memory_gb(self.device)
                flops = tokens = sup = samples = 0.0
                if first_stage_reporter and mbs:
                    for mb in mbs:
                        f = batch_flops(
                            self.mcfg, mb.cu_seqlens, [mb.image_grid_thw, mb.video_grid_thw],
                            n_supervised=mb.num_supervised, trainable=[_FLOPS_GROUP[g] for g in self.trainable_groups],
                        )
                        flops += f["total"]
                        tokens += mb.num_tokens
                        sup += mb.num_supervised
                        samples += len(mb.cu_seqlens) - 1
                stop_flag = float(self._stop_signal is not None)
                nonfinite, data_wait, mem, stop_flag = self._allreduce(
                    [nonfinite_local, t_data, mem, stop_flag], dist.ReduceOp.MAX
                )
                tokens, sup, samples, flops = self._allreduce([tokens, sup, samples, flops], dist.ReduceOp.SUM)
                if nonfinite:
                    self._zero_grad()
                    self.skipped_steps += 1
                    self.consecutive_skips += 1
                    if self.is_main:
                        log.warning("step %d: non-finite loss=%s grad_norm=%s: update skipped (%d so far)",
                                    self.step + 1, loss, gnorm, self.skipped_steps)
                else:
                    if self.optimizer is not None:
                        self.optimizer.step()
                    self._zero_grad()
                    self.consecutive_skips = 0
                self.step += 1
                self.tokens_seen += int(tokens)
                self.samples_seen += int(samples)
                dt = time.perf_counter() - t0
                if not nonfinite:
                    losses.append(loss)
                    last_loss = loss
                if self.step % cfg.metrics.log_every == 0 or self.step == total:
                    self._log_step(loss, gnorm, lrs, tokens, sup, samples, flops, dt, data_wait, mem)
                tcfg = cfg.train
                if self.skipped_steps > tcfg.max_skipped_steps or self.consecutive_skips >= tcfg.max_consecutive_skips:
                    msg = (
                        f"stopping at step {self.step}: {self.skipped_steps} steps skipped for a non-finite loss or "
                        f"gradient norm ({self.consecutive_skips} in a row; limits train.max_skipped_steps="
                        f"{tcfg.max_skipped_steps}, train.max_consecutive_skips={tcfg.max_consecutive_skips}). "
                        "The run diverged: lower optim.lr, raise optim.warmup_steps or check the data; resume from "
                        f"the last good checkpoint in {self.ckpt.dir}."
                    )
                    self.metrics.event("stop", step=self.step, reason="diverged", message=msg)
                    raise TrainingStopped(msg)
                due = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total
                if due or stop_flag:
                    self.save()
                if stop_flag:
                    stop_reason = "signal"
                    if self.is_main:
                        log.warning("stop requested by a signal: checkpoint saved at step %d; rerun to resume",
                                    self.step)
                    break
            if stop_reason != "signal" and cfg.checkpoint.save_final and self.step > self._saved_step:
                self.save()
            self.ckpt.wait()
            self.metrics.event("end", step=self.step, reason=stop_reason, skipped_steps=self.skipped_steps)
        finally:
            for s, prev in self._prev_handlers.items():
                signal.signal(s, prev)
        return TrainResult(
            run_dir=self.run_dir, final_step=self.step, final_loss=last_loss, checkpoint=self.ckpt.latest(),
            losses=losses, skipped_steps=self.skipped_steps, stop_reason=stop_reason,
        )

    def _log_step(self, loss, gnorm, lrs, tokens, sup, samples, flops, dt, data_wait, mem) -> None:
        loader_metrics = self._loader_metrics()
        world = self.layout.world
        rec = {
            "step": self.step,
            "loss": loss,
            "lr": next(iter(lrs.values())),
            "lr_groups": lrs,
            "grad_norm": gnorm,
            "tokens": int(tokens),
            "supervised_tokens": int(sup),
            "samples": int(samples),
            "tokens_seen": self.tokens_seen,
            "step_time_s": round(dt, 4),
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "flops": flops,
            "flops_per_s": flops / dt if dt > 0 else 0.0,
            "tflops_per_device": flops / dt / world / 1e12 if dt > 0 else 0.0,
            "mfu": (flops / dt / world / (self.peak_tflops * 1e12)) if self.peak_tflops and dt > 0 else None,
            "data_wait_s": round(data_wait, 5),
            "peak_mem_gb": round(mem, 3),
            "skipped_steps": self.skipped_steps,
            **loader_metrics,
        }
        self.metrics.log(rec)

    def _loader_metrics(self) -> dict[str, Any]:
        """Loader counters summed over dp ranks (one reporter per dp rank): skipped samples by reason and the
        packing efficiency (real tokens / token budget) of everything consumed so far in this data pass."""
        local: dict[str, float] = {}
        if self.loader is not None and self.layout.tp_rank == 0:
            m = self.loader.metrics()
            local = {k: v for k, v in m.items() if k.startswith("skipped/") or k in ("batches", "tokens", "truncated")}
        gathered: list[dict[str, float] | None] = [None] * self.layout.world
        dist.all_gather_object(gathered, local)
        tot: dict[str, float] = {}
        for g in gathered:
            for k, v in (g or {}).items():
                tot[k] = tot.get(k, 0) + v
        out: dict[str, Any] = {
            "skipped_samples": {k[len("skipped/"):]: int(v) for k, v in tot.items() if k.startswith("skipped/")}
        }
        if tot.get("batches"):
            out["packing_efficiency"] = round(tot["tokens"] / (tot["batches"] * self.cfg.data.max_tokens), 4)
        if tot.get("truncated"):
            out["truncated_samples"] = int(tot["truncated"])
        return out

    def close(self) -> None:
        self.ckpt.wait()
        if self.loader is not None:
            self.loader.close()
        self.metrics.close()


def run(cfg: JobConfig) -> TrainResult:
    """Train one stage (all ranks call it)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
