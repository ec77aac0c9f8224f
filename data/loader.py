"""The training loader: packed microbatches from WebDataset shards / indexed text, resumable exactly.

Public API (the train loop codes against exactly this):

    from data.config import DataConfig, DatasetSpec
    from data.loader import build_loader

    cfg = DataConfig.from_dict(recipe["data"])          # strict: unknown keys / wrong types raise
    loader = build_loader(cfg, dp_rank, dp_size)         # never calls torch.distributed
    loader.load_state_dict(saved)                        # optional, before iterating
    for batch in loader:                                 # core.batch.PackedBatch, CPU tensors, one microbatch
        ...
        state = loader.state_dict()                      # small picklable dict; store it per dp rank
    loader.metrics()                                     # {"samples": .., "tokens": .., "packing_efficiency": ..,
                                                         #  "skipped/<reason>": .., "wait_s": .., ...}
    loader.close()

`for batch in loader` runs until every dataset finished its `epochs` (forever when epochs is None). Iterating
again continues from the current state (it never restarts the data).

Exact resume (Megatron-Energon's design, rebuilt on torch's DataLoader):
- there are W = max(1, num_workers) LOGICAL workers per rank, each a deterministic pipeline
  (data.pipeline.WorkerPipeline) over its slice of the data; global worker g = dp_rank * W + w;
- every microbatch travels with the state of its logical worker right after producing it (counters and the
  sample references in its buffers, no bytes); the main process keeps, per logical worker, the state of the last
  microbatch it CONSUMED, and the logical worker whose turn is next;
- torch's DataLoader hands out items round-robin over its workers (skipping finished ones), so after a restore
  physical worker i runs logical worker (next + i) % W: the consumption order continues unchanged;
- restoring a worker re-reads only the samples in its buffers (random access through the sidecar indexes).
The batches after load_state_dict() are torch.equal to the uninterrupted run's (tests/data/test_resume.py).
Resuming needs the same datasets, seed, budgets, num_workers and dp_size; otherwise load_state_dict raises,
naming what changed.

NOTE: with finite epochs, ranks may produce different numbers of microbatches (packing is per rank); the
train loop must stop all ranks when one runs out (or use epochs=None and a step count, the usual setup).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.batch import PackedBatch
from data.config import DataConfig
from data.pipeline import WorkerPipeline
from data.sources import DatasetPlan, plan_dataset
from data.storage import storage_metrics
from data.tokenizer import Tokenizer

log = logging.getLogger("data.loader")
STATE_VERSION = 1


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    # The Rust tokenizer's own thread pool is useless (and warns) inside forked workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Workers(IterableDataset):
    """The DataLoader's dataset: physical worker i runs logical worker order[i] from its saved state."""

    def __init__(self, cfg: DataConfig, plans: list[DatasetPlan], dp_rank: int, dp_size: int, order: list[int],
                 states: list[dict | None]) -> None:
        self.cfg, self.plans, self.dp_rank, self.dp_size = cfg, plans, dp_rank, dp_size
        self.order, self.states = order, states

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = self.order[info.id if info is not None else 0]
        W = len(self.order)
        pipe = WorkerPipeline(self.cfg, self.plans, self.dp_rank * W + w, self.dp_size * W, self.states[w])
        for batch, state in pipe:
            yield {"worker": w, "batch": None if batch is None else batch.as_dict(), "state": state,
                   "storage": storage_metrics()}


class Loader:
    """Iterable of PackedBatch with state_dict / load_state_dict / metrics (see the module docstring)."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int) -> None:
        cfg.validate()
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.W = max(1, cfg.num_workers)
        # Loaded (and checked) here: a bad path fails now, and forked workers inherit the loaded tokenizer.
        Tokenizer.load(cfg.tokenizer)
        self.plans = [plan_dataset(i, spec, cfg.storage) for i, spec in enumerate(cfg.datasets)]
        G = dp_size * self.W
        for p in self.plans:
            if p.total < G:
                raise ValueError(
                    f"dataset {p.label!r} has {p.total} samples, fewer than dp_size * num_workers = {G} "
                    "readers: lower num_workers or use a larger dataset"
                )
        self._states: list[dict | None] = [None] * self.W
        self._next = 0
        self._main: Counter = Counter()
        self._storage: dict[int, dict] = {}  # per logical worker: its process's storage counters (not restored)
        self._it: Iterator[dict] | None = None
        self._dl_iter = None

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {
            "datasets": [[d.path, d.kind, d.weight, d.supervise, d.append_eod] for d in c.datasets],
            "samples": [p.total for p in self.plans],
            "seed": c.seed, "max_tokens": c.max_tokens, "max_patches": c.patch_budget,
            "min_pixels": c.min_pixels, "max_pixels": c.max_pixels, "supervise": c.supervise,
            "overlong": c.overlong, "default_system": c.default_system, "pretrain_eos": c.pretrain_eos,
            "shuffle_buffer": c.shuffle_buffer, "shuffle_buffer_bytes": c.shuffle_buffer_bytes,
            "pack_buffer": c.pack_buffer, "pack_buffer_patches": c.pack_patch_cap, "epochs": c.epochs,
            "logical_workers": self.W, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
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
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume the loader exactly: these settings differ from the saved state (saved, now): "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + ". Restore the saved values (or start the data from scratch without load_state_dict)."
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
        ds = _Workers(self.cfg, self.plans, self.dp_rank, self.dp_size, order, copy.deepcopy(self._states))
        if self.cfg.num_workers == 0:
            return iter(ds)
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            collate_fn=_identity,
            timeout=self.cfg.worker_timeout_s,
            worker_init_fn=_worker_init,
            multiprocessing_context=self.cfg.start_method,
            persistent_workers=False,
        )
        self._dl_iter = iter(dl)
        return self._dl_iter

    def __iter__(self) -> Iterator[PackedBatch]:
        self._shutdown()
        it = self._source()
        self._it = it
        try:
            while self._expected() is not None:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    break
                self._main["wait_s_x1e6"] += int((time.perf_counter() - t0) * 1e6)
                w, expected = item["worker"], self._expected()
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
        finally:
            if self._it is it:
                self._shutdown()

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
        workers: Counter = Counter()
        epochs: list[list[int]] = []
        for st in self._states:
            if st is not None:
                workers.update(st["counters"])
                epochs.append([s["epoch"] for s in st["streams"]])
        out["samples_read"] = int(workers.get("samples_read", 0))
        out["truncated"] = int(workers.get("truncated", 0))
        skips = {k: int(v) for k, v in workers.items() if k.startswith("skipped/")}
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
        if dl_iter is not None and hasattr(dl_iter, "_shutdown_workers"):
            dl_iter._shutdown_workers()
        del it

    def close(self) -> None:
        self._shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._shutdown()


def build_loader(cfg: DataConfig, dp_rank: int, dp_size: int) -> Loader:
    """The loader of one data-parallel rank (reads dataset manifests; starts no process until iterated)."""
    return Loader(cfg, dp_rank, dp_size)


__all__ = ["Loader", "build_loader"]

