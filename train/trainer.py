"""The train loop of one stage: build (data sources checked first, then where the run starts: train/start.py),
step, log, checkpoint.

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

Resume ("auto", train/start.py): the latest complete checkpoint of checkpoint.dir restores weights, optimizer,
the trainer's counters (the Trainer is Stateful), RNG states and each dp rank's loader position, so the resumed
run continues bitwise where the saved one was (same layout). Under a different layout, weights and optimizer state
reshard (DCP); loader positions are restored when the dp size is unchanged, otherwise the loader restarts its
stream (see docs/train.md).
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
from torch.distributed.checkpoint.stateful import Stateful

from core.config import ConfigError
from data.loader import DataError, Loader, LoaderInterrupted, build_loader, check_sources
from data.sources import DatasetPlan, plan_dataset
from model.family import get_family, hf_config_dict
from model.flops import batch_flops
from parallel import ParallelModel, init_distributed, parallelize
from train.checkpoint import CheckpointManager, Layout
from train.config import GROUPS, JobConfig
from train.eval import Evaluator
from train.lora import apply_recipe_lora, trainable_by_group
from train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gb
from train.optim import ScheduleState, apply_freeze, build_optimizer, optimizer_step, set_lr
from train.prefetch import DevicePrefetcher
from train.resume_data import data_meta
from train.run_lock import acquire_run_lock, release_run_lock
from train.start import load_start, plan_start, start_model
from train.state import BlobState, LoaderState, ModelState, OptimizerState, rng_state
from train.straggler import StragglerMonitor

log = logging.getLogger(__name__)

# A new pass over the data (after a dp-size change) reseeds the loader by this much per pass.
DATA_PASS_SEED_STRIDE = 1_000_003
# model.flops names the vision group 'vit'.
COUNTERS = ("step", "skipped_steps", "consecutive_skips", "tokens_seen", "samples_seen", "data_pass")
"""The trainer's own checkpointed state (`trainer.<counter>`), identical on every rank."""


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


@dataclass
class StepStats:
    """What one optimizer step measured (reduced over ranks where it says so). The loss, the gradient norm and
    whether the update was skipped stay on the device until the loop reads them, all pending steps in one read,
    at the next step that needs them (a log, checkpoint or evaluation step, a stop, the end): `resolved`."""

    step: int
    """The step this was (1-based: the trainer's step counter after it)."""
    loss_t: torch.Tensor
    grad_norm_t: torch.Tensor
    nonfinite_t: torch.Tensor
    """A non-finite loss or gradient norm: the update was skipped (decided on the device)."""
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
    stop_requested: bool
    """A rank received SIGTERM / SIGUSR1 / SIGINT."""
    loss: float = math.nan
    grad_norm: float = math.nan
    skipped: bool = False
    """The update was skipped: a non-finite loss or gradient norm (identical on every rank: both are global)."""
    resolved: bool = False
    """loss, grad_norm and skipped hold the device values."""


class Trainer(Stateful):
    """Builds everything for one stage; `train()` runs it, one `train_step()` at a time. All ranks build one.
    Stateful: its counters (COUNTERS) are the checkpoint's `trainer.*`; checkpoint_state() lists the rest."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self._init_distributed()
        # One training per run directory (train/run_lock.py): taken before anything there is read or written.
        self.run_lock = acquire_run_lock([self.run_dir, cfg.checkpoint_dir], self.is_main, self.device)
        # ---- 1. the data sources, before anything big is built: a wrong path, a missing index or bad credentials
        # fail in seconds, not after minutes of building and loading a 72B model.
        self.data_plans = self._check_data()
        # ---- 2. where the run starts (train/start.py): resume, init_from or fresh, and the architecture
        self.ckpt = self._checkpoint_manager()
        self.start = plan_start(cfg, self.ckpt, self.is_main)
        self.mcfg = self.start.model_config
        # ---- 3. the model for that start, frozen, sharded; its optimizer
        torch.manual_seed(cfg.train.seed)
        self.engine, self.trainable_counts = self._build_engine()
        self.optimizer = build_optimizer(list(self.engine.named_parameters()), cfg, get_family(self.mcfg.family))
        self.trainable_groups = [g for g in GROUPS if g not in cfg.frozen_groups]
        # ---- 4. the checkpointed state, loaded from the start (resume: all of it; init_from: the weights)
        self.step = self.skipped_steps = self.consecutive_skips = 0
        self._diverged: tuple[int, int, int] | None = None
        """(step, skipped, in a row) where the skip limits were first crossed (train.max_*skip*)."""
        self.tokens_seen = self.samples_seen = 0
        self.data_pass = 0  # bumped when the loader cannot continue its position (dp size changed)
        self.schedule = ScheduleState(cfg)
        self.loader_state = LoaderState(f"dp{self.layout.dp_rank}")
        load_start(self, self.engine, self.start)
        self._saved_step = self.step
        # ---- 5. the data (seeded by the restored data pass), metrics, evaluation, monitors
        self._stop_signal: int | None = None
        self.loader = self._build_loader()
        self._it = None
        self.metrics = MetricsLogger(cfg, self.is_main, resumed_from=self.step if self.resume_path else None)
        self.evaluator = (Evaluator(cfg, self.engine, self.layout, self.mcfg, self.metrics, self.m)
                          if cfg.eval.datasets else None)
        self.peak_tflops = device_peak_tflops(self.device, cfg.metrics.peak_tflops)
        self.prefetcher = DevicePrefetcher(self.device)
        self.straggler = StragglerMonitor(cfg.metrics.straggler_every, cfg.metrics.straggler_ratio, self.layout.rank,
                                          self.layout.pp_rank, self.device, self.metrics.event, self.is_main,
                                          self.loader)
        if self.is_main:
            cfg.save(self.run_dir / "config.yaml")
        self.metrics.event(
            "start", step=self.step, layout=self.layout.describe(), stage=cfg.train.stage,
            frozen=list(cfg.frozen_groups), trainable_params=self.trainable_counts,
            resumed_from=str(self.resume_path) if self.resume_path else None, init_from=cfg.model.init_from,
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), data_pass=self.data_pass,
            microbatches_per_rank=self.m,
        )

    # ------------------------------------------------------------------------------------ building
    def _init_distributed(self) -> None:
        """The process group and mesh, where this rank sits, and the per-rank microbatch count."""
        cfg = self.cfg
        self.dims = d = init_distributed(cfg.parallel)
        self.layout = Layout(
            dp=d.dp, tp=d.tp, pp=d.pp, dp_rank=d.dp_rank, tp_rank=d.tp_rank, pp_rank=d.pp_rank,
            rank=dist.get_rank(), world=dist.get_world_size(),
        )
        self.device = d.device
        self.is_main = self.layout.rank == 0
        self.m = cfg.microbatches_per_rank(d.dp)
        if cfg.parallel.num_microbatches != self.m and cfg.train.global_microbatches is not None:
            cfg.parallel.num_microbatches = self.m  # the engine reads it (pipeline schedule length)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.run_dir)

    def _check_data(self) -> list[DatasetPlan]:
        """Every data source of the run (the tokenizer, the training datasets for this dp size, the eval datasets)
        read as far as a loader would before its first sample. On every rank: none is left waiting in a collective
        for a rank that failed."""
        cfg = self.cfg
        plans = check_sources(cfg.data, self.layout.dp)
        for i, spec in enumerate(cfg.eval.datasets):
            plan_dataset(i, spec, cfg.data.storage)
        return plans

    def _checkpoint_manager(self) -> CheckpointManager:
        c = self.cfg.checkpoint
        # A separate gloo group for checkpoint collectives: async saves run them from a background thread,
        # which must not interleave with the training collectives of the default group.
        self.ckpt_pg = dist.new_group(backend="gloo") if c.async_save else None
        return CheckpointManager(self.cfg.checkpoint_dir, self.layout, c.keep_last, c.async_save, self.ckpt_pg,
                                 timeout_s=self.cfg.parallel.timeout_s)

    def _build_engine(self) -> tuple[ParallelModel, dict[str, int]]:
        """The model for the start (train/start.py), frozen once, before the engine wraps it (frozen parameters get
        no gradient, optimizer state or gradient reduction), then sharded; a model built on the meta device gets
        its shards here, randomly initialized when no weights will be loaded. Returns the engine and the
        trainable parameter count of each group. With a lora: section, the adapters go on the model after freezing
        (train/lora.py): every base weight frozen, the adapters (and lora.fully_trainable groups) train."""
        cfg = self.cfg
        model, on_meta = start_model(self.start)
        counts = apply_freeze(model.named_parameters(), cfg.frozen_groups, get_family(self.mcfg.family))
        if apply_recipe_lora(model, cfg.lora, cfg.frozen_groups, cfg.train.seed):
            counts = trainable_by_group(model.named_parameters(), self.mcfg.family)
        engine = parallelize(model, self.dims, cfg.parallel)
        if on_meta:
            engine.materialize(init_weights=not self.start.loads_weights)
        return engine, counts

    def _build_loader(self) -> Loader | None:
        """The first pipeline stage's loader (tp peers get identical microbatches; later stages consume none),
        seeded by the data pass, at the resumed position when one was loaded."""
        if not self.layout.has_data:
            return None
        cfg = self.cfg
        data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + DATA_PASS_SEED_STRIDE * self.data_pass)
        # A stop signal is honoured while the loader waits for data (it polls this between short waits).
        loader = build_loader(data_cfg, self.layout.dp_rank, self.layout.dp,
                              interrupt=lambda: self._stop_signal is not None, plans=self.data_plans,
                              vision=get_family(self.mcfg.family).processing(self.mcfg))
        try:
            self.loader_state.attach(loader)
        except ValueError as e:
            raise ConfigError(
                f"cannot restore the data position from {self.resume_path}: {e} "
                "(checkpoint.data_state=restart starts the data from the beginning, a new reseeded pass)"
            ) from e
        return loader

    # ------------------------------------------------------------------------------------ state
    @property
    def resume_path(self) -> Path | None:
        """The checkpoint this run resumed from (None: a new run)."""
        return self.start.resume

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COUNTERS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k in COUNTERS:
            setattr(self, k, int(state_dict[k]))

    def checkpoint_state(self) -> dict[str, Any]:
        """The Stateful objects of a checkpoint (train/state.py) on this rank: one DCP save, one DCP load."""
        state: dict[str, Any] = {
            "model": ModelState(self.engine.modules),
            "optim": OptimizerState(self.engine.modules, self.optimizer),
            "trainer": self,
            "schedule": self.schedule,
            "rng": BlobState(f"rank{self.layout.rank}", rng_state()),
        }
        if self.layout.has_data and self.layout.tp_rank == 0:
            state["loader"] = self.loader_state
        return state

    def save(self) -> None:
        if self.consecutive_skips == 0:
            self.ckpt.protected = None  # a good checkpoint again: the streak's protection ends with this save
        meta = {"model_config": hf_config_dict(self.mcfg), "stage": self.cfg.train.stage,
                "frozen": list(self.cfg.frozen_groups), "tokens_seen": self.tokens_seen,
                **data_meta(self.cfg.data, get_family(self.mcfg.family).processing(self.mcfg))}
        self.ckpt.save(self.step, self.checkpoint_state(), self.cfg.to_yaml(), meta)
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

    def _step_flops(self, mbs: list) -> tuple[float, float, float, float]:
        """(FLOPs, tokens, supervised tokens, samples) of this rank's microbatches (one reporter per dp rank)."""
        flops = tokens = sup = samples = 0.0
        if self.layout.pp_rank == 0 and self.layout.tp_rank == 0 and mbs:
            for mb in mbs:
                f = batch_flops(
                    self.mcfg, mb.cu_seqlens, [mb.image_grid_thw, mb.video_grid_thw],
                    n_supervised=mb.num_supervised, trainable=self.trainable_groups,
                )
                flops += f["total"]
                tokens += mb.num_tokens
                sup += mb.num_supervised
                samples += len(mb.cu_seqlens) - 1
        return flops, tokens, sup, samples

    def train_step(self) -> StepStats | None:
        """One optimizer step on every rank: microbatches, forward + backward (the engine), global clipping, the
        update (skipped on every rank when the loss or the gradient norm is not finite). None when the data ran
        out. Nothing here waits for the device (with the fused AdamW): the microbatches are prepared on the host
        before their copy, the step's host values travel in the engine's one exchange, clipping and the skip are
        decided on the device; the loss and the norm are read later, by _resolve."""
        cfg = self.cfg
        lrs = set_lr(self.optimizer, self.step, cfg)
        t0 = time.perf_counter()
        mbs = self.engine.prepare(self._next_microbatches())
        # CUDA: pinned, non-blocking copies on a side stream (train/prefetch.py); the host copies stay for the
        # FLOP count, which would otherwise read device tensors back.
        device_mbs = self.prefetcher.to_device(mbs)
        t_data = time.perf_counter() - t0
        flops, _, _, samples = self._step_flops(mbs)
        # A first-stage rank out of data stops every rank (the engine returns None on all, before any compute).
        res = self.engine.step(device_mbs, exhausted=self.layout.has_data and mbs is None,
                               host_values={"data_wait": t_data, "samples": samples, "flops": flops})
        if res is None:
            return None
        # max_norm 0 = measure only (the engine scales nothing), so grad_clip: 0 disables clipping.
        gnorm_t = self.engine.clip_grad_norm_(cfg.optim.grad_clip)
        nonfinite_t = ~(torch.isfinite(res.loss_t) & torch.isfinite(gnorm_t))
        if self.optimizer is not None:
            optimizer_step(self.optimizer, nonfinite_t)
        self._zero_grad()
        # A signal that arrived during the step stops every rank after it (a host exchange, no device wait).
        (stop,) = self.engine.host_max([float(self._stop_signal is not None)])
        self.step += 1
        self.tokens_seen += res.num_tokens
        self.samples_seen += int(res.host_sum["samples"])
        return StepStats(step=self.step, loss_t=res.loss_t, grad_norm_t=gnorm_t, nonfinite_t=nonfinite_t, lrs=lrs,
                         tokens=res.num_tokens, supervised=res.num_supervised, samples=res.host_sum["samples"],
                         flops=res.host_sum["flops"], step_time_s=time.perf_counter() - t0,
                         data_wait_s=res.host_max["data_wait"], stop_requested=bool(stop))

    def _resolve(self, pending: list[StepStats], losses: list[float]) -> None:
        """Read the pending steps' loss, norm and skip flag in one device read, then do each step's bookkeeping in
        order: the skip counters, a skip streak's protected checkpoint, the warning, the divergence check (no
        checkpoint is saved between two reads, so the newest one is the one a streak began after)."""
        if not pending:
            return
        vals = torch.stack([torch.stack([st.loss_t.double(), st.grad_norm_t.double(), st.nonfinite_t.double()])
                            for st in pending]).tolist()
        for st, (loss, gnorm, nonfinite) in zip(pending, vals):
            st.loss, st.grad_norm, st.skipped, st.resolved = loss, gnorm, bool(nonfinite), True
            if st.skipped:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                if self.consecutive_skips == 1:
                    # A streak of skipped steps begins: the newest checkpoint is the last good one; keep_last must
                    # not prune it while the run may be diverging, and nothing is saved until it recovers.
                    self.ckpt.wait()
                    self.ckpt.protected = self.ckpt.latest()
                if self.is_main:
                    log.warning("step %d: non-finite loss=%s grad_norm=%s: update skipped (%d so far)",
                                st.step, loss, gnorm, self.skipped_steps)
            else:
                self.consecutive_skips = 0
                losses.append(loss)
            self._note_divergence(st.step)
        pending.clear()

    # ------------------------------------------------------------------------------------ loop
    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 (SLURM's warning before a time limit) and SIGINT ask for a checkpoint and a stop at the
        end of the step; a second SIGINT (Ctrl-C twice) aborts at once."""

        owner = os.getpid()

        def handler(signum, frame):  # noqa: ARG001
            if os.getpid() != owner:
                # A loader worker forked after this was installed: a terminal's Ctrl-C signals the whole process
                # group, and the training process alone stops the run (and says so once).
                return
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

    def _note_divergence(self, step: int) -> None:
        """Remember the first step at which the skip limits were crossed (_resolve, step by step); the loop
        stops after that step's log line (_check_divergence)."""
        tcfg = self.cfg.train
        if self._diverged is None and (self.skipped_steps > tcfg.max_skipped_steps
                                       or self.consecutive_skips >= tcfg.max_consecutive_skips):
            self._diverged = (step, self.skipped_steps, self.consecutive_skips)

    def _check_divergence(self) -> None:
        tcfg = self.cfg.train
        if self._diverged is not None:
            step, skipped, in_a_row = self._diverged
            msg = (
                f"stopping at step {step}: {skipped} steps skipped for a non-finite loss or "
                f"gradient norm ({in_a_row} in a row; limits train.max_skipped_steps="
                f"{tcfg.max_skipped_steps}, train.max_consecutive_skips={tcfg.max_consecutive_skips}). "
                "The run diverged: lower optim.lr, raise optim.warmup_steps or check the data; resume from "
                + (f"the last checkpoint saved before the skips began, {self.ckpt.protected}."
                   if self.ckpt.protected is not None else f"an earlier run, no checkpoint exists in {self.ckpt.dir}.")
            )
            self.metrics.event("stop", step=step, reason="diverged", message=msg)
            raise TrainingStopped(msg)

    def train(self) -> TrainResult:
        self._t_start = time.perf_counter()
        self._step_ema: float | None = None
        self._install_signal_handlers()
        losses: list[float] = []
        pending: list[StepStats] = []
        stop_reason = "completed"
        try:
            while self.step < self.cfg.train.steps:
                self.ckpt.poll()
                st = self.straggler.timed(self.train_step, lambda: self.step)
                if st is None:
                    self._resolve(pending, losses)
                    stop_reason = self._no_microbatches()
                    break
                pending.append(st)
                if self._needs_values(st):
                    self._resolve(pending, losses)
                if self._after_step(st):
                    stop_reason = "signal"
                    break
            self._resolve(pending, losses)
            self._check_divergence()
            self._finish(stop_reason)
        finally:
            for s, prev in self._prev_handlers.items():
                signal.signal(s, prev)
        return TrainResult(
            run_dir=self.run_dir, final_step=self.step, final_loss=losses[-1] if losses else None,
            checkpoint=self.ckpt.latest(), losses=losses, skipped_steps=self.skipped_steps, stop_reason=stop_reason,
            stop_signal=(self._stop_signal or signal.SIGTERM) if stop_reason == "signal" else None,
            elapsed_s=time.perf_counter() - self._t_start,
        )

    def _no_microbatches(self) -> str:
        """The stop reason when a step got no microbatches: a stop signal while waiting for data, or the end of
        the data."""
        if self._stop_signal is not None:
            log.warning("stop requested by a signal while waiting for data at step %d: nothing saved "
                        "(mid-step); the latest complete checkpoint is the one to resume", self.step)
            return "signal"
        if self.is_main:
            log.warning("data exhausted at step %d of %d (data.epochs=%s)", self.step, self.cfg.train.steps,
                        self.cfg.data.epochs)
        return "data_exhausted"

    def _log_due(self) -> bool:
        return self.step % self.cfg.metrics.log_every == 0 or self.step == self.cfg.train.steps

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.train.steps

    def _needs_values(self, st: StepStats) -> bool:
        """Whether this step reads the pending loss / norm / skip flags: it logs, may save or evaluate, stops, or
        ends the run. Other steps queue theirs (metrics.log_every sets how often a run waits for the device)."""
        return self._log_due() or self._checkpoint_due() or st.stop_requested

    def _after_step(self, st: StepStats) -> bool:
        """The step's log line, a due evaluation and checkpoint (the values they need are resolved by then:
        _needs_values). True when a stop signal ends the run at this step (after its checkpoint)."""
        if self._log_due():
            self._log_step(st)
        self._check_divergence()
        if self.evaluator is not None:
            self.evaluator.maybe_run(self.step, final=False)
        due = self._checkpoint_due()
        if (due or st.stop_requested) and self.consecutive_skips == 0:
            self.save()
        elif (due or st.stop_requested) and self.is_main:
            log.warning("step %d: not saving a checkpoint while steps are being skipped (%d in a row); "
                        "the last good one is %s", self.step, self.consecutive_skips, self.ckpt.protected)
        if st.stop_requested and self.is_main:
            log.warning("stopped by a signal at step %d; rerun the same command to resume from %s",
                        self.step, self.ckpt.latest())
        return st.stop_requested

    def _finish(self, stop_reason: str) -> None:
        """The final checkpoint (unless a signal stopped the run: its checkpoint is saved), the stage's final
        evaluation, the end record."""
        if (stop_reason != "signal" and self.cfg.checkpoint.save_final and self.step > self._saved_step
                and self.consecutive_skips == 0):
            self.save()
        self.ckpt.wait()
        if self.evaluator is not None and stop_reason != "signal":
            self.evaluator.maybe_run(self.step, final=True)
        self.metrics.event("end", step=self.step, reason=stop_reason, skipped_steps=self.skipped_steps)

    def _progress(self, dt: float) -> dict[str, float]:
        """Elapsed wall time of this process's train() and the ETA from a moving average of the step time (the
        first step of a process, which pays for warm-up, only seeds it)."""
        a = 0.1
        self._step_ema = dt if self._step_ema is None else (1 - a) * self._step_ema + a * dt
        return {"elapsed_s": round(time.perf_counter() - self._t_start, 2),
                "eta_s": round(self._step_ema * (self.cfg.train.steps - self.step), 2)}

    def _log_step(self, st: StepStats) -> None:
        loader_metrics, peak_mem = self._loader_metrics()
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
            "peak_mem_gb": round(peak_mem, 3),
            "skipped_steps": self.skipped_steps,
            "trainable_params": sum(self.trainable_counts.values()),
            **self._progress(dt),
            **loader_metrics,
        }
        self.metrics.log(rec)

    def _loader_metrics(self) -> tuple[dict[str, Any], float]:
        """Loader counters summed over dp ranks (one reporter per dp rank): skipped samples by reason and the
        packing efficiency (real tokens / token budget) of everything consumed so far in this data pass; and the
        largest peak device memory of any rank (GB), gathered with them (log steps only)."""
        local: dict[str, float] = {"peak_mem_gb": peak_memory_gb(self.device)}
        if self.loader is not None and self.layout.tp_rank == 0:
            m = self.loader.metrics()
            local.update({k: v for k, v in m.items()
                          if k.startswith("skipped/") or k in ("batches", "tokens", "truncated", "clamped_boxes")})
        gathered: list[dict[str, float] | None] = [None] * self.layout.world
        dist.all_gather_object(gathered, local)
        tot: dict[str, float] = {}
        peak = 0.0
        for g in gathered:
            for k, v in (g or {}).items():
                if k == "peak_mem_gb":
                    peak = max(peak, v)
                else:
                    tot[k] = tot.get(k, 0) + v
        out: dict[str, Any] = {
            "skipped_samples": {k[len("skipped/"):]: int(v) for k, v in tot.items() if k.startswith("skipped/")}
        }
        if tot.get("batches"):
            out["packing_efficiency"] = round(tot["tokens"] / (tot["batches"] * self.cfg.data.max_tokens), 4)
        if tot.get("truncated"):
            out["truncated_samples"] = int(tot["truncated"])
        if tot.get("clamped_boxes"):
            out["clamped_boxes"] = int(tot["clamped_boxes"])
        return out, peak

    def close(self) -> None:
        self.ckpt.wait()
        if self.loader is not None:
            self.loader.close()
        self.metrics.close()
        release_run_lock(self.run_lock)


def run(cfg: JobConfig) -> TrainResult:
    """Train one stage (all ranks call it)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()
