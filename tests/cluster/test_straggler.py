"""Straggler detection (train/straggler.py): the verdict from per-rank timings, and its premise on real gloo: a
rank that waits in a collective for a slow peer burns no CPU, so the peer, not the waiter, is named, although
both see the same wall time per step. (The end-to-end check over two hosts is in test_two_hosts.py.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from slow_rank import burn_cpu, parse_slow_rank

from core.config import ConfigError
from train.config import load_config
from train.straggler import RankTiming, StragglerMonitor, find_stragglers


def timing(rank: int, data: float, compute: float, stage: int = 0) -> RankTiming:
    return RankTiming(rank=rank, host=f"h{rank // 2}", pp_stage=stage, step_s=2.0, data_wait_s=data, compute_s=compute)


def test_the_slow_rank_is_flagged_with_its_host_and_cause():
    rep = find_stragglers([timing(0, 0.01, 0.50), timing(1, 0.02, 0.55), timing(2, 0.01, 0.52),
                           timing(3, 0.01, 1.60)], ratio=1.5)
    assert (rep["slowest"]["rank"], rep["slowest"]["host"]) == (3, "h1")
    assert rep["median_busy_s"] == pytest.approx((0.53 + 0.57) / 2)  # busy 0.51, 0.57, 0.53, 1.61
    assert [(f["rank"], f["cause"]) for f in rep["flagged"]] == [(3, "compute")]
    rep = find_stragglers([timing(0, 0.01, 0.5), timing(1, 0.9, 0.5), timing(2, 0.01, 0.5)], ratio=1.5)
    assert [(f["rank"], f["cause"]) for f in rep["flagged"]] == [(1, "data")]


def test_peers_are_the_ranks_of_one_pipeline_stage():
    # A healthy pp2 x dp2: stage 1 (the LM head) does twice stage 0's work; nobody is a straggler.
    healthy = [timing(0, 0.0, 0.5, 0), timing(1, 0.0, 0.55, 0), timing(2, 0.0, 1.0, 1), timing(3, 0.0, 1.1, 1)]
    rep = find_stragglers(healthy, ratio=1.5)
    assert rep["flagged"] == [] and rep["ratio"] < 1.1
    # Against all ranks, stage 1 would look 1.9x slow: that is what the per-stage median avoids.
    assert find_stragglers([RankTiming(**{**t.__dict__, "pp_stage": 0}) for t in healthy], ratio=1.5)["ratio"] > 1.3
    # A stage with one rank compares against every rank.
    rep = find_stragglers([timing(0, 0.0, 0.5, 0), timing(1, 0.0, 0.5, 0), timing(2, 0.0, 2.0, 1)], ratio=1.5)
    assert [f["rank"] for f in rep["flagged"]] == [2]


def test_bad_settings_are_errors_naming_the_value():
    with pytest.raises(ValueError, match="QWEN2VL_SLOW_RANK='3'.*RANK:SECONDS"):
        parse_slow_rank("3")
    assert parse_slow_rank("3:0.5") == (3, 0.5) and parse_slow_rank("") is None
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "stage3.yaml"
    with pytest.raises(ConfigError, match="metrics.straggler_ratio=1.0"):
        load_config(recipe, ["metrics.straggler_ratio=1.0"])
    with pytest.raises(ConfigError, match="metrics.straggler_every=-1"):
        load_config(recipe, ["metrics.straggler_every=-1"])


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    events: list = []
    mon = StragglerMonitor(every=5, ratio=1.5, rank=rank, pp_stage=0, device=torch.device("cpu"),
                           event=lambda name, **f: events.append({"event": name, **f}), is_main=rank == 0)
    t = torch.ones(1024)
    for step in range(1, 6):
        # The step is a collective; rank 1 burns 0.4 s of CPU before it (a slow device), rank 0 waits in it.
        mon.timed(lambda: (burn_cpu(0.4 * (rank == 1)), dist.all_reduce(t)), lambda s=step: s)
    if rank == 0:
        Path(out).write_text(json.dumps(events))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_waiting_in_a_gloo_collective_is_not_busy(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "events.json"
    mp.start_processes(_worker, args=(port, str(out)), nprocs=2, join=True, start_method="spawn")
    check, flagged = json.loads(out.read_text())
    assert check["event"] == "straggler_check" and check["window_steps"] == 4  # step 1 is warm-up
    r0, r1 = check["ranks"]
    # Rank 0 spent each step waiting in all_reduce for rank 1: the same wall time, little CPU. Compared with the
    # run's own figures, not an absolute bound: rank 1 burns its 0.4 s of CPU per step (at least that much),
    # rank 0 computes far less than that and less than half of its step (the rest is the wait). The step's wall
    # time and the burn's CPU time come from different clocks and windows: a step measured 0.3999 s around a 0.4 s
    # burn, hence 0.38.
    assert r0["step_s"] >= 0.3 and r1["step_s"] >= 0.38 and r1["compute_s"] >= 0.4
    assert r0["compute_s"] < r1["compute_s"] / 4 and r0["compute_s"] < r0["step_s"] / 2, (r0, r1)
    assert (flagged["event"], flagged["rank"], flagged["cause"]) == ("straggler", 1, "compute")
