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

from core.config import ConfigError
from data.loader import DataError, LoaderInterrupted, build_loader
from model.flops import batch_flops
from model.hf_adapter import is_hf_dir, load_hf_slices
from model.lora import is_adapter_key
from model.lora_peft import is_peft_dir
from model.qwen2_vl import Qwen2VL
from parallel import init_distributed, parallelize
from train.checkpoint import (
    CheckpointManager,
    Layout,
    checkpoint_keys,
    list_complete,
    read_meta,
    resolve_checkpoint,
    step_dirs,
)
from train.config import JobConfig
from train.eval import Evaluator
from train.lora import apply_recipe_lora, lora_refreeze, peft_base, peft_init_state, reset_adapters, trainable_by_group
from train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from train.optim import apply_freeze, build_optimizer, set_lr
from train.prefetch import DevicePrefetcher
from train.state import BlobState, ModelState, OptimizerState, ValuesState, rng_state, set_rng_state
from train.straggler import StragglerMonitor
from train.weights import describe_init, load_checkpoint_weights, meta_model, resolve_model_config

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
    stop_signal: int | None = None
    """The signal that stopped the run (stop_reason 'signal'): the CLI exits with 128 + its number."""
    elapsed_s: float = 0.0
    """Wall time of train()."""


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


@dataclass
class StepStats:
    """What one optimizer step measured (reduced over ranks where it says so)."""

    loss: float
    grad_norm: float
    lrs: dict[str, float]
    tokens: float
    """Packed tokens of the step, summed over dp ranks."""
    supervised: float
    samples: float
    flops: float
    """Model FLOPs of the step (model.flops), summed over ranks."""
    step_time_s: float
    data_wait_s: float
    """The longest wait for the loader over ranks."""
    peak_mem_gb: float
    skipped: bool
    """The update was skipped: a non-finite loss or gradient norm on some rank."""
    stop_requested: bool
    """A rank received SIGTERM / SIGUSR1 / SIGINT."""


class Trainer:
    """Builds everything for one stage; `train()` runs it, one `train_step()` at a time. All ranks build one."""

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
            cfg.checkpoint_dir, self.layout, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, self.ckpt_pg,
            timeout_s=cfg.parallel.timeout_s,
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
        # LoRA (train/lora.py): adapters on the recipe's targets, every other base weight frozen.
        if apply_recipe_lora(model, cfg.lora, cfg.frozen_groups, cfg.train.seed):
            self.trainable_counts = trainable_by_group(model.named_parameters(), self.mcfg.family)
        self.engine = parallelize(model, self.dims, cfg.parallel)
        if not full_init:
            self.engine.materialize(init_weights=not loading)
        apply_freeze(self.engine.named_parameters(), cfg.frozen_groups)
        lora_refreeze(self.engine.named_parameters(), cfg.lora, cfg.frozen_groups, self.mcfg.family)
        self.optimizer = build_optimizer(list(self.engine.named_parameters()), cfg)
        self.trainable_groups = [g for g in ("vision", "merger", "llm") if g not in cfg.frozen_groups]

        # ---- counters (checkpointed)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.data_pass = 0  # bumped when the loader cannot continue its position (dp size changed)

        # ---- resume (one load of everything) or init_from; then the data, seeded by the restored data pass
        loader_state = None
        resumed_from = None
        if self.resume_path is not None:
            loader_state = self._load_resume(self.resume_path)
            resumed_from = self.step
        elif cfg.model.init_from is not None:
            self._load_init(cfg.model.init_from)
        self._saved_step = self.step
        self.loader = None  # only the first pipeline stage consumes microbatches (tp peers get identical ones)
        if self.layout.has_data:
            data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + DATA_PASS_SEED_STRIDE * self.data_pass)
            # A stop signal is honoured while the loader waits for data (it polls this between short waits).
            self.loader = build_loader(data_cfg, d.dp_rank, d.dp, interrupt=lambda: self._stop_signal is not None)
            if loader_state is not None:
                try:
                    self.loader.load_state_dict(loader_state)
                except ValueError as e:
                    raise ConfigError(
                        f"cannot restore the data position from {self.resume_path}: {e} (to continue with a new, "
                        "reseeded pass over the data instead, set checkpoint.data_state=restart)"
                    ) from e
        self._it = None
        self.metrics = MetricsLogger(cfg, self.is_main, resumed_from=resumed_from)
        self.evaluator = (Evaluator(cfg, self.engine, self.layout, self.mcfg, self.metrics, self.m)
                          if cfg.eval.datasets else None)
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self.prefetcher = DevicePrefetcher(self.device)
        self.straggler = StragglerMonitor(cfg.metrics.straggler_every, cfg.metrics.straggler_ratio, self.layout.rank,
                                          d.pp_rank, self.device, self.metrics.event, self.is_main, self.loader)
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

    # ------------------------------------------------------------------------------------ state
    def _counters(self) -> dict[str, int]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen, "data_pass": self.data_pass}

    def _set_counters(self, c: dict[str, Any]) -> None:
        self.step, self.skipped_steps = int(c["step"]), int(c["skipped_steps"])
        self.consecutive_skips, self.tokens_seen = int(c["consecutive_skips"]), int(c["tokens_seen"])
        self.samples_seen, self.data_pass = int(c["samples_seen"]), int(c["data_pass"])

    def _schedule(self) -> dict[str, Any]:
        """The settings that decide every step's update: a resumed run that changes one is warned about."""
        o = self.cfg.optim
        out: dict[str, Any] = {f"lr_{g}": self.cfg.group_lr(g) for g in ("vision", "merger", "llm")}
        out.update(schedule=o.schedule, warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                   steps=self.cfg.train.steps, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps)
        return out

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """Called after a resume's load: warn about every schedule setting the recipe changed."""
        now = self._schedule()
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed and self.is_main:
            log.warning("resuming with a different optimizer schedule than the checkpoint's (saved -> now): %s; "
                        "the new values apply from step %d", "; ".join(changed), self.step + 1)

    def _state(self) -> dict[str, Any]:
        """The Stateful objects of a checkpoint (train/state.py) for this rank."""
        state: dict[str, Any] = {
            "model": ModelState(self.engine.modules),
            "optim": OptimizerState(self.engine.modules, self.optimizer),
            "trainer": ValuesState(self._counters, self._set_counters),
            "schedule": ValuesState(self._schedule, lambda saved: setattr(self, "_saved_schedule", saved)),
            "rng": BlobState(f"rank{self.layout.rank}", rng_state()),
        }
        if self.layout.has_data and self.layout.tp_rank == 0:
            state["loader"] = BlobState(f"dp{self.layout.dp_rank}",
                                        self.loader.state_dict() if getattr(self, "loader", None) else None)
        return state

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
            found, rejected = self.ckpt.newest_verified()
            if self.is_main:
                for line in rejected:
                    log.warning("checkpoint %s -- it fails verification and is passed over", line)
            if found is None:
                damaged = sorted(p.name for p in step_dirs(self.cfg.checkpoint_dir))
                if damaged:
                    raise ConfigError(
                        f"{self.cfg.checkpoint_dir} holds step directories ({', '.join(damaged[-3:])}) but none is a "
                        "complete, verified checkpoint: restore the files (each step's meta.json lists them with "
                        "their checksums), or set checkpoint.resume=never to start over from model.init_from"
                    )
            elif rejected and self.is_main:
                log.warning("resuming from %s, the newest checkpoint that verifies", found.name)
            return found
        path = resolve_checkpoint(r)
        problems = self.ckpt.verify(path)
        if problems:
            raise ConfigError(f"checkpoint.resume={r}: {path} is damaged: {'; '.join(problems[:3])}")
        return path

    def _load_init(self, src: str) -> None:
        adapters_loaded = False
        if is_hf_dir(src) or is_peft_dir(src):
            # An HF directory holds no adapters; a peft adapter directory names its HF base (train/lora.py).
            base = peft_base(src) if is_peft_dir(src) else src
            sd = {k: v for k, v in self.engine.state_dict().items() if not is_adapter_key(k)}
            load_hf_slices(sd, base, self.mcfg)
            self.engine.load_state_dict(sd, strict=self.cfg.lora is None)
            if is_peft_dir(src):
                self.engine.load_state_dict(peft_init_state(self.mcfg, self.cfg.lora, src), strict=False)
                adapters_loaded = True
        else:
            ck = resolve_checkpoint(src)
            problems = self.ckpt.verify(ck)
            if problems:
                raise ConfigError(f"model.init_from={src}: {ck} is damaged: {'; '.join(problems[:3])}")
            adapters_loaded = load_checkpoint_weights(self.engine.modules, ck)
        if self.cfg.lora is not None and not adapters_loaded:
            reset_adapters(self.engine.modules)  # the weights came without adapters: start exactly at them
        if self.is_main:
            log.info("initialized weights from %s", describe_init(src))

    def _load_resume(self, path: Path) -> Any:
        """Load everything of checkpoint `path` in one DCP load; returns this rank's loader position to restore
        (None when the data continues with a new pass: dp size changed or checkpoint.data_state=restart)."""
        saved = read_meta(path)["layout"]
        same_dp = saved["dp"] == self.layout.dp
        same_layout = same_dp and saved["tp"] == self.layout.tp and saved["pp"] == self.layout.pp
        restore_data = same_dp and self.cfg.checkpoint.data_state == "exact"
        state = self._state()
        if not same_layout:
            state.pop("rng")  # RNG streams belong to ranks of one layout
        if not restore_data:
            state.pop("loader", None)
        keys = checkpoint_keys(path)
        absent = [f"{name}.{k}" for name, obj in state.items() if name in ("model", "optim")
                  for k in obj.state_dict() if f"{name}.{k}" not in keys]
        if absent:
            raise ConfigError(
                f"checkpoint {path} has no {absent[0]} (and {len(absent) - 1} more): it was saved with other "
                "trainable groups or another model. To start a new stage from its weights, use model.init_from "
                "with checkpoint.resume=never in a new run_dir."
            )
        if "loader" in state and f"loader.{state['loader'].key}" not in keys:
            raise ConfigError(f"checkpoint {path} has no loader state for dp rank {self.layout.dp_rank}")
        self.ckpt.load(path, state)
        self._check_schedule(getattr(self, "_saved_schedule", {}))
        if "rng" in state:
            set_rng_state(state["rng"].value)
        if not restore_data:
            self.data_pass += 1
            if self.is_main:
                why = (f"the dp size changed ({saved['dp']} -> {self.layout.dp}): a loader position is per dp rank "
                       "and cannot be mapped to another dp size" if not same_dp else "checkpoint.data_state=restart")
                log.warning("resuming %s: %s; the data continues with a new pass, reseeded (data pass %d)",
                            path, why, self.data_pass)
        if self.step > self.cfg.train.steps:
            raise ConfigError(
                f"checkpoint {path} is at step {self.step}, past this recipe's train.steps={self.cfg.train.steps}: "
                f"raise train.steps above {self.step}, or start a new run_dir"
            )
        if self.is_main:
            log.info("resumed from %s at step %d (saved as dp%d x tp%d x pp%d)", path, self.step, saved["dp"],
                     saved["tp"], saved["pp"])
        return state["loader"].value if "loader" in state else None

    def save(self) -> None:
        if self.consecutive_skips == 0:
            self.ckpt.protected = None  # a good checkpoint again: the streak's protection ends with this save
        meta = {"model_config": self.mcfg.to_hf_dict(), "stage": self.cfg.train.stage,
                "frozen": list(self.cfg.frozen_groups), "tokens_seen": self.tokens_seen}
        self.ckpt.save(self.step, self._state(), self.cfg.to_yaml(), meta)
        self._saved_step = self.step
        self.metrics.event("checkpoint", step=self.step, seconds=round(self.ckpt.save_seconds, 3),
                           path=str(self.ckpt.dir / f"step_{self.step:08d}"))

    # ------------------------------------------------------------------------------------ one step
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
            except LoaderInterrupted:  # a stop signal while waiting: train() stops (no save mid-step)
                return None
            except DataError as e:  # nothing usable, a stalled worker, too many bad shards: the message says why
                raise TrainingStopped(str(e)) from e
        return out

    def _zero_grad(self) -> None:
        for _, p in self.engine.named_parameters():
            p.grad = None

    def _allreduce(self, values: list[float], op: dist.ReduceOp) -> list[float]:
        # On the training device: the default group is NCCL on GPUs, which takes CUDA tensors only.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _step_flops(self, mbs: list) -> tuple[float, float, float, float]:
        """(FLOPs, tokens, supervised tokens, samples) of this rank's microbatches (one reporter per dp rank)."""
        flops = tokens = sup = samples = 0.0
        if self.layout.pp_rank == 0 and self.layout.tp_rank == 0 and mbs:
            for mb in mbs:
                f = batch_flops(
                    self.mcfg, mb.cu_seqlens, [mb.image_grid_thw, mb.video_grid_thw],
                    n_supervised=mb.num_supervised, trainable=[_FLOPS_GROUP[g] for g in self.trainable_groups],
                )
                flops += f["total"]
                tokens += mb.num_tokens
                sup += mb.num_supervised
                samples += len(mb.cu_seqlens) - 1
        return flops, tokens, sup, samples

    def train_step(self) -> StepStats | None:
        """One optimizer step on every rank: microbatches, forward + backward (the engine), global clipping, the
        update (skipped on every rank when any rank saw a non-finite value). None when the data ran out."""
        cfg = self.cfg
        lrs = set_lr(self.optimizer, self.step, cfg)
        t0 = time.perf_counter()
        mbs = self._next_microbatches()
        # CUDA: pinned, non-blocking copies on a side stream (train/prefetch.py); the host copies stay for the
        # FLOP count, which would otherwise read device tensors back.
        device_mbs = self.prefetcher.to_device(mbs)
        t_data = time.perf_counter() - t0
        # Every rank must agree before the engine runs: a first-stage rank out of data stops all.
        (exhausted,) = self._allreduce([float(self.layout.has_data and mbs is None)], dist.ReduceOp.MAX)
        if exhausted:
            return None
        res = self.engine.step(device_mbs)
        # max_norm 0 = measure only (the engine scales nothing), so grad_clip: 0 disables clipping.
        gnorm = float(self.engine.clip_grad_norm_(cfg.optim.grad_clip))
        loss = float(res.loss)
        nonfinite_local = float(not (math.isfinite(loss) and math.isfinite(gnorm)))
        flops, tokens, sup, samples = self._step_flops(mbs)
        nonfinite, data_wait, mem, stop_flag = self._allreduce(
            [nonfinite_local, t_data, peak_memory_gb(self.device), float(self._stop_signal is not None)],
            dist.ReduceOp.MAX,
        )
        tokens, sup, samples, flops = self._allreduce([tokens, sup, samples, flops], dist.ReduceOp.SUM)
        if nonfinite:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.is_main:
                log.warning("step %d: non-finite loss=%s grad_norm=%s: update skipped (%d so far)",
                            self.step + 1, loss, gnorm, self.skipped_steps)
        else:
            if self.optimizer is not None:
                self.optimizer.step()
            self.consecutive_skips = 0
        self._zero_grad()
        self.step += 1
        self.tokens_seen += int(tokens)
        self.samples_seen += int(samples)
        return StepStats(loss=loss, grad_norm=gnorm, lrs=lrs, tokens=tokens, supervised=sup, samples=samples,
                         flops=flops, step_time_s=time.perf_counter() - t0, data_wait_s=data_wait, peak_mem_gb=mem,
                         skipped=bool(nonfinite), stop_requested=bool(stop_flag))

    # ------------------------------------------------------------------------------------ loop
    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 (SLURM's warning before a time limit) and SIGINT ask for a checkpoint and a stop at the
        end of the step; a second SIGINT (Ctrl-C twice) aborts at once."""

        def handler(signum, frame):  # noqa: ARG001
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                log.warning("%s received: saving a checkpoint at the end of this step, then stopping%s",
                            signal.Signals(signum).name, " (Ctrl-C again aborts at once)" if signum == signal.SIGINT
                            else "")

        self._prev_handlers = {}
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. embedded use): no handler
                self._prev_handlers[s] = signal.signal(s, handler)

    def _check_divergence(self) -> None:
        tcfg = self.cfg.train
        if self.skipped_steps > tcfg.max_skipped_steps or self.consecutive_skips >= tcfg.max_consecutive_skips:
            msg = (
                f"stopping at step {self.step}: {self.skipped_steps} steps skipped for a non-finite loss or "
                f"gradient norm ({self.consecutive_skips} in a row; limits train.max_skipped_steps="
                f"{tcfg.max_skipped_steps}, train.max_consecutive_skips={tcfg.max_consecutive_skips}). "
                "The run diverged: lower optim.lr, raise optim.warmup_steps or check the data; resume from "
                + (f"the last checkpoint saved before the skips began, {self.ckpt.protected}."
                   if self.ckpt.protected is not None else f"an earlier run, no checkpoint exists in {self.ckpt.dir}.")
            )
            self.metrics.event("stop", step=self.step, reason="diverged", message=msg)
            raise TrainingStopped(msg)

    def train(self) -> TrainResult:
        cfg = self.cfg
        total = cfg.train.steps
        self._t_start = time.perf_counter()
        self._step_ema: float | None = None
        self._install_signal_handlers()
        losses: list[float] = []
        last_loss: float | None = None
        stop_reason = "completed"
        try:
            while self.step < total:
                self.ckpt.poll()
                st = self.straggler.timed(self.train_step, lambda: self.step)
                if st is None and self._stop_signal is not None:  # interrupted while waiting for data
                    stop_reason = "signal"
                    log.warning("stop requested by a signal while waiting for data at step %d: nothing saved "
                                "(mid-step); the latest complete checkpoint is the one to resume", self.step)
                    break
                if st is None:
                    stop_reason = "data_exhausted"
                    if self.is_main:
                        log.warning("data exhausted at step %d of %d (data.epochs=%s)", self.step, total,
                                    cfg.data.epochs)
                    break
                if not st.skipped:
                    losses.append(st.loss)
                    last_loss = st.loss
                elif self.consecutive_skips == 1:
                    # A streak of skipped steps begins: the newest checkpoint is the last good one; keep_last
                    # must not prune it while the run may be diverging, and nothing is saved until it recovers.
                    self.ckpt.wait()
                    self.ckpt.protected = self.ckpt.latest()
                if self.step % cfg.metrics.log_every == 0 or self.step == total:
                    self._log_step(st)
                self._check_divergence()
                if self.evaluator is not None:
                    self.evaluator.maybe_run(self.step, final=False)
                due = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total
                if (due or st.stop_requested) and self.consecutive_skips == 0:
                    self.save()
                elif (due or st.stop_requested) and self.is_main:
                    log.warning("step %d: not saving a checkpoint while steps are being skipped (%d in a row); "
                                "the last good one is %s", self.step, self.consecutive_skips, self.ckpt.protected)
                if st.stop_requested:
                    stop_reason = "signal"
                    if self.is_main:
                        log.warning("stopped by a signal at step %d; rerun the same command to resume from %s",
                                    self.step, self.ckpt.latest())
                    break
            if (stop_reason != "signal" and cfg.checkpoint.save_final and self.step > self._saved_step
                    and self.consecutive_skips == 0):
                self.save()
            self.ckpt.wait()
            if self.evaluator is not None and stop_reason != "signal":  # the stage's final figures
                self.evaluator.maybe_run(self.step, final=True)
            self.metrics.event("end", step=self.step, reason=stop_reason, skipped_steps=self.skipped_steps)
        finally:
            for s, prev in self._prev_handlers.items():
                signal.signal(s, prev)
        return TrainResult(
            run_dir=self.run_dir, final_step=self.step, final_loss=last_loss, checkpoint=self.ckpt.latest(),
            losses=losses, skipped_steps=self.skipped_steps, stop_reason=stop_reason,
            stop_signal=(self._stop_signal or signal.SIGTERM) if stop_reason == "signal" else None,
            elapsed_s=time.perf_counter() - self._t_start,
        )

    def _progress(self, dt: float) -> dict[str, float]:
        """Elapsed wall time of this process's train() and the ETA from a moving average of the step time (the
        first step of a process, which pays for warm-up, only seeds it)."""
        a = 0.1
        self._step_ema = dt if self._step_ema is None else (1 - a) * self._step_ema + a * dt
        return {"elapsed_s": round(time.perf_counter() - self._t_start, 2),
                "eta_s": round(self._step_ema * (self.cfg.train.steps - self.step), 2)}

    def _log_step(self, st: StepStats) -> None:
        loader_metrics = self._loader_metrics()
        world, dt = self.layout.world, st.step_time_s
        rec = {
            "step": self.step,
            "loss": st.loss,
            "lr": next(iter(st.lrs.values())),
            "lr_groups": st.lrs,
            "grad_norm": st.grad_norm,
            "tokens": int(st.tokens),
            "supervised_tokens": int(st.supervised),
            "samples": int(st.samples),
            "tokens_seen": self.tokens_seen,
            "step_time_s": round(dt, 4),
            "tokens_per_s": st.tokens / dt if dt > 0 else 0.0,
            "flops": st.flops,
            "flops_per_s": st.flops / dt if dt > 0 else 0.0,
            "tflops_per_device": st.flops / dt / world / 1e12 if dt > 0 else 0.0,
            "mfu": (st.flops / dt / world / (self.peak_tflops * 1e12)) if self.peak_tflops and dt > 0 else None,
            "data_wait_s": round(st.data_wait_s, 5),
            "peak_mem_gb": round(st.peak_mem_gb, 3),
            "skipped_steps": self.skipped_steps,
            "trainable_params": sum(self.trainable_counts.values()),
            **self._progress(dt),
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
