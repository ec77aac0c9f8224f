"""The training loader: packed microbatches from WebDataset shards / indexed text, resumable exactly.

Public API (the train loop codes against exactly this):

    from data.config import DataConfig, DatasetSpec
    from data.loader import build_loader, check_sources

    cfg = DataConfig.from_dict(recipe["data"])          # strict: unknown keys / wrong types raise
    plans = check_sources(cfg, dp_size)                  # optional: the sources checked, no sample read
    vision = get_family(mcfg.family).processing(mcfg)    # the model family's processor facts
    loader = build_loader(cfg, dp_rank, dp_size,         # never calls torch.distributed
                          interrupt=lambda: stop_requested,  # optional: polled while waiting for data
                          plans=plans,                   # optional: check_sources' (else it checks them)
                          vision=vision)                 # optional: None = Qwen2-VL's (its tiny preset's)
    loader.load_state_dict(saved)                        # optional, before iterating
    for batch in loader:                                 # core.batch.PackedBatch, CPU tensors, one microbatch
        ...
        state = loader.state_dict()                      # small picklable dict; store it per dp rank
    loader.metrics()                                     # {"samples": .., "tokens": .., "packing_efficiency": ..,
                                                         #  "skipped/<reason>": .., "wait_s": .., ...}
    loader.close()

`for batch in loader` runs until every dataset finished its `epochs` (forever when epochs is None). Iterating
again continues from the current state (it never restarts the data).

A loader built for a family gives what that family's transformers processor gives (tests/data): its resize
factor and pixel bounds, its chat template's default system prompt, its video time encoding (Qwen2.5-VL's
seconds per frame pair in the position ids, Qwen3-VL's text timestamps and per-frame-pair blocks) and its M-RoPE
position ids (model.processing.VisionProcessing); pixel rows are as wide as its patches.

Faults: unreadable shards and bad samples are counted skips (metrics "skipped/<reason>"). Iteration raises a
DataError (one message naming the datasets, the skip counts by reason and the fix) when the data cannot feed
training: NoUsableData (it ended without a single microbatch), DataStalled (a worker skipped a whole pass of its
data, or for worker_timeout_s, or got stuck), TooManyBadShards (data.max_bad_shard_fraction), TooManySampleErrors
(data.max_error_fraction: samples whose processing raised an unanticipated error, each a counted skip `error`).
While it waits for a microbatch the loader logs what a quiet worker reports (every data.stall_report_s) and polls
`interrupt` in short slices: when it answers True, next() raises LoaderInterrupted (the consumed position is
unchanged).

Exact resume (Megatron-Energon's design, rebuilt on torch's DataLoader):
- there are W = max(1, num_workers) LOGICAL workers per rank, each a deterministic pipeline
  (data.pipeline.WorkerPipeline) over its slice of the data; global worker g = dp_rank * W + w;
- every microbatch travels with the state of its logical worker right after producing it (counters and the
  sample references in its buffers, no bytes); the main process keeps, per logical worker, the state of the last
  microbatch it CONSUMED, and the logical worker whose turn is next;
- torch's DataLoader hands out items round-robin over its workers (skipping finished ones), so after a restore
  physical worker i runs logical worker (next + i) % W: the consumption order continues unchanged;
- restoring a worker re-reads only the samples in its buffers (random access through the sidecar indexes).
The batches after load_state_dict() are torch.equal to the uninterrupted run's (tests/data/test_loader_resume.py).
Resuming needs the same datasets, seed, budgets, num_workers and dp_size; otherwise load_state_dict raises,
naming what changed.

NOTE: with finite epochs, ranks may produce different numbers of microbatches (packing is per rank); the
train loop must stop all ranks when one runs out (or use epochs=None and a step count, the usual setup).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing as mp
import os
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.batch import PackedBatch
from data.config import DataConfig
from data.fingerprint import family_facts
from data.media.vision import vision_or_default
from data.pipeline import (
    ERRORS,
    DataError,
    DataStalled,
    LoaderInterrupted,
    NoUsableData,
    TooManyBadShards,
    TooManySampleErrors,
    WorkerPipeline,
    format_counts,
)
from data.sources import DatasetPlan, plan_dataset
from data.storage import storage_metrics
from data.tokenizer import Tokenizer
from model.processing import VisionProcessing

log = logging.getLogger("data.loader")
STATE_VERSION = 1
# The training process waits for a microbatch in slices this long, so it notices `interrupt`, worker reports and
# a stuck worker without depending on torch's DataLoader timeout (whose error names nothing).
POLL_S = 0.25


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    # The Rust tokenizer's own thread pool is useless (and warns) inside forked workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Workers(IterableDataset):
    """The DataLoader's dataset: physical worker i runs logical worker order[i] from its saved state.

    Warnings for the training log (bad shards, stall reports) travel through `reports` (a multiprocessing queue,
    beside the data path, so they never change the order of microbatches); in the training process itself
    (num_workers 0) they are logged directly and `interrupt` is polled between samples. A DataError ends the
    worker with an item that carries it, raised by the training process in the worker's turn."""

    def __init__(self, cfg: DataConfig, plans: list[DatasetPlan], dp_rank: int, dp_size: int, order: list[int],
                 states: list[dict | None], vision: VisionProcessing, reports=None,
                 interrupt: Callable[[], bool] | None = None, stop=None) -> None:
        self.cfg, self.plans, self.dp_rank, self.dp_size = cfg, plans, dp_rank, dp_size
        self.order, self.states, self.vision = order, states, vision
        self.reports, self.interrupt, self.stop = reports, interrupt, stop

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = self.order[info.id if info is not None else 0]
        W = len(self.order)
        notify = None
        if self.reports is not None:
            self.reports.cancel_join_thread()  # a full queue must never keep a finished worker from exiting

            def notify(msg: str, q=self.reports) -> None:
                with contextlib.suppress(queue.Full):
                    q.put_nowait((w, msg))

        # In a worker process, `stop` (set when the training process shuts the workers down) ends the pipeline at
        # its next sample, so a shutdown never waits for a worker busy skipping.
        interrupt = self.interrupt if info is None else (self.stop.is_set if self.stop is not None else None)
        pipe = WorkerPipeline(self.cfg, self.plans, self.dp_rank * W + w, self.dp_size * W, self.states[w],
                              notify=notify, interrupt=interrupt, vision=self.vision)
        try:
            for batch, state in pipe:
                item = {"worker": w, "batch": None if batch is None else batch.as_dict(), "state": state,
                        "storage": storage_metrics()}
                if batch is None:
                    item["examples"] = pipe.examples
                yield item
        except DataError as e:
            yield {"worker": w, "batch": None, "state": None, "error": (type(e).__name__, str(e)),
                   "examples": pipe.examples}


class Loader:
    """Iterable of PackedBatch with state_dict / load_state_dict / metrics (see the module docstring)."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int,
                 interrupt: Callable[[], bool] | None = None, plans: list[DatasetPlan] | None = None,
                 vision: VisionProcessing | None = None) -> None:
        self.vision = vision_or_default(vision)
        cfg.validate(self.vision)
        self.interrupt = interrupt
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.W = max(1, cfg.num_workers)
        self.plans = check_sources(cfg, dp_size) if plans is None else plans
        self._states: list[dict | None] = [None] * self.W
        self._next = 0
        self._main: Counter = Counter()
        self._storage: dict[int, dict] = {}  # per logical worker: its process's storage counters (not restored)
        self._it: Iterator[dict] | None = None
        self._dl_iter = None
        self._reports = None
        self._stop = None
        self._examples: dict[str, str] = {}  # first skip message per reason, from finished workers

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        c, v = self.cfg, self.vision
        lo, hi = c.image_pixels(v)
        return {
            "datasets": [[d.path, d.kind, d.weight, d.supervise, d.append_eod] for d in c.datasets],
            "samples": [p.total for p in self.plans],
            "seed": c.seed, "max_tokens": c.max_tokens, "max_patches": c.patch_budget,
            "min_pixels": lo, "max_pixels": hi, "supervise": c.supervise,
            "overlong": c.overlong, "default_system": c.system_prompt(v), "pretrain_eos": c.pretrain_eos,
            "shuffle_buffer": c.shuffle_buffer, "shuffle_buffer_bytes": c.shuffle_buffer_bytes,
            "pack_buffer": c.pack_buffer, "pack_buffer_patches": c.pack_patch_cap, "epochs": c.epochs,
            "logical_workers": self.W, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "max_video_sample_tokens": c.video_sample_tokens, "max_video_sample_patches": c.video_sample_patches,
            "video_max_tokens": c.resolved_video(v).max_tokens,
            "family": family_facts(v),
        }

    def state_dict(self) -> dict:
        """The consumed position: small, picklable, to be saved per dp rank."""
        return {
            "version": STATE_VERSION,
            "config": self._fingerprint(),
            "next_worker": self._next,
            "workers": copy.deepcopy(self._states),
            "main": dict(self._main),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine, theirs = self._fingerprint(), state["config"]
        # Keys a state saved by an older version lacks are not compared (it predates those settings).
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if diff:
            raise ValueError(
                "cannot resume the loader exactly: these settings differ from the saved state (saved, now): "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + ". Restore the saved values to continue exactly, or start the data from the beginning."
            )
        self._shutdown()
        self._states = copy.deepcopy(state["workers"])
        self._next = int(state["next_worker"])
        self._main = Counter(state["main"])

    # ------------------------------------------------------------------ iteration
    def _expected(self) -> int | None:
        for i in range(self.W):
            w = (self._next + i) % self.W
            st = self._states[w]
            if st is None or not st.get("done"):
                return w
        return None

    def _source(self) -> Iterator[dict]:
        order = [(self._next + i) % self.W for i in range(self.W)]
        if self.cfg.num_workers == 0:
            return iter(_Workers(self.cfg, self.plans, self.dp_rank, self.dp_size, order,
                                 copy.deepcopy(self._states), self.vision, interrupt=self.interrupt))
        ctx = mp.get_context(self.cfg.start_method)
        self._reports, self._stop = ctx.Queue(maxsize=256), ctx.Event()
        ds = _Workers(self.cfg, self.plans, self.dp_rank, self.dp_size, order, copy.deepcopy(self._states),
                      self.vision, reports=self._reports, stop=self._stop)
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            collate_fn=_identity,
            timeout=POLL_S,  # a slice of the wait (see _next_item), not the worker timeout
            worker_init_fn=_worker_init,
            multiprocessing_context=ctx,
            persistent_workers=False,
        )
        self._dl_iter = iter(dl)
        return self._dl_iter

    def _drain_reports(self, heard: dict[int, float]) -> None:
        q = self._reports
        while q is not None:
            try:
                w, msg = q.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            heard[w] = time.monotonic()
            log.warning("%s", msg)

    def _next_item(self, it: Iterator[dict], heard: dict[int, float]) -> dict | None:
        """The next item of the workers, or None at the end. Waits in slices: logs the workers' reports, raises
        LoaderInterrupted when `interrupt` answers True and DataStalled when the worker whose turn it is stays
        silent (no item, no report) for worker_timeout_s + stall_report_s."""
        if self._dl_iter is None:  # in-process: the pipeline itself polls interrupt and logs its reports
            return next(it, None)
        w = self._expected()
        t0 = time.monotonic()
        while True:
            self._drain_reports(heard)
            if self.interrupt is not None and self.interrupt():
                raise LoaderInterrupted(f"interrupted while waiting for loader worker {w}")
            try:
                return next(it)
            except StopIteration:
                return None
            except RuntimeError as e:
                # NOTE: torch's DataLoader raises a plain RuntimeError when `timeout` (our slice) passes; its
                # iterator is unchanged then and the next call waits again. Anything else (a dead worker) is real.
                if "DataLoader timed out" not in str(e):
                    raise
            now = time.monotonic()
            silent = now - max(t0, heard.get(w, t0)) if w is not None else 0.0
            if silent > self.cfg.worker_timeout_s + self.cfg.stall_report_s:
                raise DataStalled(
                    f"loader worker {w} sent nothing (no microbatch, no report) for {silent:.0f} s: it is stuck (a "
                    f"storage read or a video decode that never returns?); skips so far: "
                    f"{format_counts(self._skip_counts())}. Raise data.worker_timeout_s if its samples are that slow"
                )

    def __iter__(self) -> Iterator[PackedBatch]:
        self._shutdown()
        it = self._source()
        self._it = it
        heard: dict[int, float] = {}
        try:
            while self._expected() is not None:
                t0 = time.perf_counter()
                item = self._next_item(it, heard)
                if item is None:
                    break
                self._main["wait_s_x1e6"] += int((time.perf_counter() - t0) * 1e6)
                w, expected = item["worker"], self._expected()
                heard[w] = time.monotonic()
                for reason, msg in (item.get("examples") or {}).items():
                    self._examples.setdefault(reason, msg)
                if item.get("error"):
                    name, msg = item["error"]
                    raise ERRORS.get(name, DataError)(msg)
                if w != expected:
                    raise RuntimeError(
                        f"loader worker order broke: got logical worker {w}, expected {expected}; exact resume "
                        "relies on torch DataLoader's round-robin order (in_order=True)"
                    )
                self._states[w] = item["state"]
                self._storage[w] = item.get("storage") or {}
                self._next = (w + 1) % self.W
                if item["batch"] is None:
                    continue
                batch = PackedBatch(**item["batch"])
                self._account(batch)
                yield batch
            if not self._main["batches"]:
                raise NoUsableData(self._no_data_message())
        finally:
            if self._it is it:
                self._shutdown()

    def _worker_counters(self) -> Counter:
        """The logical workers' counters summed (as of the microbatches consumed)."""
        workers: Counter = Counter()
        for st in self._states:
            if st is not None:
                workers.update(st["counters"])
        return workers

    def _skip_counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._worker_counters().items() if k.startswith("skipped/")}

    def _no_data_message(self) -> str:
        skips = self._skip_counts()
        names = ", ".join(repr(p.label) for p in self.plans)
        msg = (f"the data ({names}) yielded no microbatch for dp rank {self.dp_rank}: all {sum(skips.values())} "
               f"samples were skipped ({format_counts(skips)})")
        if self._examples:
            msg += "; e.g. " + " | ".join(self._examples.values())
        return msg + ". Fix the data or the config (docs/data.md lists each skip reason and its fix)"

    def _account(self, b: PackedBatch) -> None:
        m = self._main
        m["batches"] += 1
        m["samples"] += len(b.sample_keys)
        m["tokens"] += b.num_tokens
        m["supervised_tokens"] += b.num_supervised
        m["patches"] += b.num_patches
        m["images"] += int(b.image_grid_thw.shape[0])
        m["videos"] += int(b.video_grid_thw.shape[0])

    def metrics(self) -> dict[str, float | int]:
        """Consumed-data counters and skip counts (cumulative over the run, restored with the state)."""
        m = self._main
        out: dict[str, float | int] = {k: int(m.get(k, 0)) for k in
                                       ("batches", "samples", "tokens", "supervised_tokens", "patches", "images",
                                        "videos")}
        nb = max(1, out["batches"])
        out["packing_efficiency"] = out["tokens"] / (nb * self.cfg.max_tokens)
        out["patch_utilization"] = out["patches"] / (nb * self.cfg.patch_budget)
        out["wait_s"] = m.get("wait_s_x1e6", 0) / 1e6
        workers = self._worker_counters()
        states = [st for st in self._states if st is not None]
        epochs = [[s["epoch"] for s in st["streams"]] for st in states]
        out["samples_read"] = int(workers.get("samples_read", 0))
        out["truncated"] = int(workers.get("truncated", 0))
        out["clamped_boxes"] = int(workers.get("clamped_boxes", 0))
        bad: list[set[int]] = [set() for _ in self.plans]  # distinct unreadable shards found by this rank's workers
        for st in states:
            for d, stream in enumerate(st["streams"]):
                bad[d].update(sh for sh, _ in stream.get("bad", []))
        out["bad_shards"] = sum(len(b) + len(p.bad) for b, p in zip(bad, self.plans))
        skips = self._skip_counts()
        out.update(skips)
        out["skipped"] = sum(skips.values())
        for d, p in enumerate(self.plans):
            out[f"epoch/{p.label}"] = min((e[d] for e in epochs), default=0)
        storage: Counter = Counter()
        for snap in self._storage.values():
            storage.update({k: v for k, v in snap.items() if isinstance(v, (int, float))})
        out.update({f"storage/{k}": v for k, v in storage.items()})
        return out

    def _shutdown(self) -> None:
        it, self._it = self._it, None
        dl_iter, self._dl_iter = self._dl_iter, None
        stop, self._stop = self._stop, None
        if stop is not None:
            stop.set()
        if dl_iter is not None and hasattr(dl_iter, "_shutdown_workers"):
            dl_iter._shutdown_workers()
        if self._reports is not None:
            self._drain_reports({})  # what the workers said last (a bad shard found just before the end)
            self._reports = None
        del it

    def close(self) -> None:
        self._shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._shutdown()


def check_sources(cfg: DataConfig, dp_size: int) -> list[DatasetPlan]:
    """Every data source a loader of dp_size ranks reads, checked without reading a sample: the tokenizer, each
    dataset's manifest (or its shards' indexes) through its storage and credentials, enough samples for every
    reader. Raises with the fix; returns the datasets' plans (build_loader takes them, so nothing is read twice)."""
    # Loaded (and checked) here: a bad path fails now, and forked workers inherit the loaded tokenizer.
    Tokenizer.load(cfg.tokenizer)
    plans = [plan_dataset(i, spec, cfg.storage, cfg.max_bad_shard_fraction) for i, spec in enumerate(cfg.datasets)]
    G = dp_size * max(1, cfg.num_workers)
    for p in plans:
        if p.total < G:
            raise ValueError(
                f"dataset {p.label!r} has {p.total} samples, fewer than dp_size * num_workers = {G} "
                "readers: lower num_workers or use a larger dataset"
            )
    return plans


def build_loader(cfg: DataConfig, dp_rank: int, dp_size: int, interrupt: Callable[[], bool] | None = None,
                 plans: list[DatasetPlan] | None = None, vision: VisionProcessing | None = None) -> Loader:
    """The loader of one data-parallel rank (reads dataset manifests; starts no process until iterated).
    `interrupt`: polled while waiting for data; True makes next() raise LoaderInterrupted (e.g. a stop signal).
    `plans`: check_sources() of the same datasets, storage and dp size, when the caller checked them already.
    `vision`: the model family's processor facts (`get_family(mcfg.family).processing(mcfg)`); None = Qwen2-VL's
    (its tiny preset's), for callers that name no model."""
    return Loader(cfg, dp_rank, dp_size, interrupt, plans, vision)


__all__ = ["DataError", "DataStalled", "Loader", "LoaderInterrupted", "NoUsableData", "TooManyBadShards",
           "TooManySampleErrors", "build_loader", "check_sources"]

