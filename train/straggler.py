"""Straggler detection: which rank holds the job back.

In synchronous training every rank's step takes as long as the slowest rank's, because the others wait for it
in the step's collectives; the wall time of a step cannot tell them apart. What differs is how long each rank
was BUSY: waiting for its own data, or computing. Every `metrics.straggler_every` steps each rank's averages
over the window (without the first step of a process, its warm-up) are gathered to rank 0:

- step_s       wall time of train_step() (about the same on every rank);
- data_wait_s  time blocked on this rank's own loader (before any collective of the step, so it is local);
- compute_s    CPU time of this process in the step (`time.process_time`: the training thread and its intra-op
               threads). A rank blocked in a gloo collective sleeps and burns no CPU, so waiting for a slow
               peer does not count. On CUDA devices the host thread mostly launches kernels and waits, so there
               compute_s is the wall time minus the data wait, which includes waits for peers: the data wait
               still singles out a rank with a slow loader, a slow GPU shows in the step time of all ranks.

busy_s = data_wait_s + compute_s. The slowest rank's busy time is logged against the median busy time of its
peers (the ranks of the same pipeline stage, which do the same work; all ranks when its stage has no other
rank), and a rank whose busy time exceeds `metrics.straggler_ratio` x that median is flagged: a `straggler`
event in metrics.jsonl and a console warning naming its host and rank. Every check also writes a
`straggler_check` event with every rank's figures.

NOTE: with data.num_workers=0 the data is prepared in the training thread, so its CPU time shows in compute_s
as well as in data_wait_s (the usual setup loads in worker processes).
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RankTiming:
    """One rank's averages per step over a check window."""

    rank: int
    host: str
    pp_stage: int
    step_s: float
    data_wait_s: float
    compute_s: float

    @property
    def busy_s(self) -> float:
        return self.data_wait_s + self.compute_s


def find_stragglers(timings: list[RankTiming], ratio: float) -> dict[str, Any]:
    """The slowest rank against the median busy time of its peers, and every rank over `ratio` x its peers'
    median: {"slowest": {...}, "median_busy_s", "ratio", "flagged": [{rank, host, busy_s, median_busy_s, ratio,
    cause}], "ranks": [...]}. Peers are the ranks of the same pipeline stage (all ranks when a stage has one)."""
    if not timings:
        raise ValueError("find_stragglers needs the timings of at least one rank")

    def peer_median(t: RankTiming) -> float:
        peers = [x.busy_s for x in timings if x.pp_stage == t.pp_stage]
        return statistics.median(peers if len(peers) > 1 else [x.busy_s for x in timings])

    def entry(t: RankTiming) -> dict[str, Any]:
        med = peer_median(t)
        stage = [x for x in timings if x.pp_stage == t.pp_stage]
        # The cause: the part of the busy time that is further above the same stage's median.
        extra_data = t.data_wait_s - statistics.median(x.data_wait_s for x in stage)
        extra_compute = t.compute_s - statistics.median(x.compute_s for x in stage)
        return {**asdict(t), "busy_s": t.busy_s, "median_busy_s": med, "ratio": t.busy_s / max(med, 1e-9),
                "cause": "data" if extra_data > extra_compute else "compute"}

    entries = [entry(t) for t in timings]
    slowest = max(entries, key=lambda e: e["ratio"])
    return {
        "slowest": slowest,
        "median_busy_s": slowest["median_busy_s"],
        "ratio": slowest["ratio"],
        "flagged": [e for e in entries if e["ratio"] > ratio],
        "ranks": [{k: round(e[k], 4) if isinstance(e[k], float) else e[k]
                   for k in ("rank", "host", "pp_stage", "step_s", "data_wait_s", "compute_s")} for e in entries],
    }


class StragglerMonitor:
    """Times every train step of this rank; every `every` steps gathers the window over all ranks (a collective:
    every rank calls `timed` the same number of times) and reports on rank 0. every=0 turns it off."""

    def __init__(self, every: int, ratio: float, rank: int, pp_stage: int, device: torch.device,
                 event: Callable[..., None], is_main: bool, loader: Any = None) -> None:
        self.every, self.ratio, self.rank, self.pp_stage = every, ratio, rank, pp_stage
        self.device, self.event, self.is_main, self.loader = device, event, is_main, loader
        self.host = socket.gethostname()
        self._calls = 0  # steps in the current window
        self._n = 0  # of which timed (the first step of a process is not)
        self._sum = [0.0, 0.0, 0.0]  # step_s, data_wait_s, compute_s over the window
        self._warm = False

    def _loader_wait(self) -> float:
        return float(self.loader.metrics().get("wait_s", 0.0)) if self.loader is not None else 0.0

    def timed(self, step_fn: Callable[[], T], step: Callable[[], int]) -> T:
        """Run one train step, add its times to the window; at the window's end gather and report (`step()` is
        the step counter after the step)."""
        if not self.every:
            return step_fn()
        wall0, cpu0, wait0 = time.perf_counter(), time.process_time(), self._loader_wait()
        out = step_fn()
        wall = time.perf_counter() - wall0
        wait = max(0.0, self._loader_wait() - wait0)
        busy = time.process_time() - cpu0 if self.device.type == "cpu" else max(0.0, wall - wait)
        if self._warm:
            for i, v in enumerate((wall, wait, busy)):
                self._sum[i] += v
            self._n += 1
        # The first step of a process pays for warm-up (loader workers starting, allocations, sharding caches),
        # on every rank alike: timing it would only dilute the differences.
        self._warm = True
        self._calls += 1
        if self._calls == self.every:
            self._report(step())
        return out

    def _report(self, step: int) -> None:
        n, (s, w, c) = self._n, self._sum
        self._calls, self._n, self._sum = 0, 0, [0.0, 0.0, 0.0]
        if n == 0:  # every=1: the first window holds only the untimed first step (alike on every rank)
            return
        mine = RankTiming(self.rank, self.host, self.pp_stage, s / n, w / n, c / n)
        gathered: list[RankTiming | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if not self.is_main:
            return
        rep = find_stragglers([g for g in gathered if g is not None], self.ratio)
        slow = rep["slowest"]
        self.event("straggler_check", step=step, window_steps=n, slowest_rank=slow["rank"], slowest_host=slow["host"],
                   slowest_busy_s=round(slow["busy_s"], 4), median_busy_s=round(rep["median_busy_s"], 4),
                   ratio=round(rep["ratio"], 3), threshold=self.ratio, ranks=rep["ranks"])
        log.info("straggler check (steps %d-%d): slowest rank %d on %s busy %.3fs per step vs median %.3fs (%.2fx)",
                 step - n + 1, step, slow["rank"], slow["host"], slow["busy_s"], rep["median_busy_s"], rep["ratio"])
        for f in rep["flagged"]:
            self.event("straggler", step=step, rank=f["rank"], host=f["host"], pp_stage=f["pp_stage"],
                       busy_s=round(f["busy_s"], 4), median_busy_s=round(f["median_busy_s"], 4),
                       ratio=round(f["ratio"], 3), threshold=self.ratio, cause=f["cause"],
                       data_wait_s=round(f["data_wait_s"], 4), compute_s=round(f["compute_s"], 4))
            log.warning("straggler: rank %d on host %s is %.2fx slower than its peers' median (busy %.3fs vs %.3fs "
                        "per step over steps %d-%d; cause %s: data wait %.3fs, compute %.3fs; threshold "
                        "metrics.straggler_ratio=%g)", f["rank"], f["host"], f["ratio"], f["busy_s"],
                        f["median_busy_s"], step - n + 1, step, f["cause"], f["data_wait_s"], f["compute_s"],
                        self.ratio)
