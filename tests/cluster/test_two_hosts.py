"""Two hosts over a real network (tests/cluster/netns.py: network namespaces joined by a veth pair), each running
`launch/torchrun.sh` with NNODES=2 and 2 processes, c10d rendezvous on host 0's address, gloo over the veth:

- pp2 with one pipeline stage per host, and dp2 x tp2 with the tp pairs inside a host: the per-step losses equal
  the one-process run of the same recipe, and the traffic between the hosts crossed the veth pair;
- a slowed rank (tests/cluster/slow_rank.py) is named by the straggler check, with its host;
- a host loses every process (kill -9, its torchrun agent included) and a replacement agent starts on it: the
  surviving agent restarts its workers (MAX_RESTARTS), the job resumes from the latest complete checkpoint and
  ends with the uninterrupted run's losses, bitwise;
- a host that loses power and never comes back: the surviving host fails with the timeouts' errors within
  parallel.timeout_s + RDZV_TIMEOUT (plus start-up slack), it never hangs.

The one-process reference (conftest.py) reads the data with 2 logical loader workers, as dp2 does with 1 each.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import COMMON, RECIPE, assert_same_losses, events, logged_step
from netns import IFNAME, TwoHosts
from slow_rank import slow_rank_env
from train_helpers import REPO, env_for, step_records

pytestmark = pytest.mark.distributed

PP2 = ["parallel.pp=2"]                     # 4 ranks: pp2 x dp2; ranks 0-1 (node 0) stage 0, ranks 2-3 stage 1
DP2_TP2 = ["parallel.dp=2", "parallel.tp=2"]  # ranks (0, 1) and (2, 3) are tp pairs, one per node
SLOW_RANK = 3


class Job:
    """One training job over both hosts: one `launch/torchrun.sh` agent per host."""

    def __init__(self, hosts: TwoHosts, demo_dir: Path, run_dir: Path, overrides: list[str], **env: str) -> None:
        self.hosts, self.run_dir, self.overrides = hosts, run_dir, overrides
        self.logs = [run_dir.parent / f"{run_dir.name}.host{i}.log" for i in range(2)]
        self.env = env_for(demo_dir, NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR=hosts.addr[0],
                           MASTER_PORT="29400", RDZV_ID=hosts.tag, GLOO_SOCKET_IFNAME=IFNAME,
                           PYTHON=sys.executable, **env)
        self.agents: list[subprocess.Popen | None] = [None, None]

    def start(self, host: int) -> subprocess.Popen:
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), RECIPE, f"run_dir={self.run_dir}", *COMMON,
               *self.overrides]
        self.agents[host] = self.hosts.popen(host, cmd, self.env, self.logs[host], cwd=REPO)
        return self.agents[host]

    def log(self, host: int) -> str:
        return self.logs[host].read_text() if self.logs[host].is_file() else ""

    def tails(self) -> str:
        return "".join(f"\n--- host {i} log (tail)\n{self.log(i)[-6000:]}" for i in range(2))

    def wait_for_step(self, step: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while logged_step(self.run_dir) < step:
            if time.monotonic() > deadline or any(a.poll() is not None for a in self.agents if a):
                raise AssertionError(f"step {step} was not logged within {timeout}s{self.tails()}")
            time.sleep(0.05)

    def wait(self, host: int, timeout: float) -> int:
        try:
            return self.agents[host].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"host {host}'s agent still runs after {timeout}s{self.tails()}") from None

    def run(self, timeout: float = 240) -> None:
        """Both agents from start to a successful end."""
        for h in (0, 1):
            self.start(h)
        for h in (0, 1):
            assert self.wait(h, timeout) == 0, self.tails()


def rank_hosts(run_dir: Path) -> dict[int, tuple[str, int]]:
    """{rank: (hostname, pipeline stage)} as the first straggler check reported it."""
    check = events(run_dir, "straggler_check")[0]
    return {r["rank"]: (r["host"], r["pp_stage"]) for r in check["ranks"]}


@pytest.fixture(scope="module")
def pp2_run(module_two_hosts, demo_dir, tmp_path_factory) -> tuple[Path, dict]:
    """pp2 over the two hosts, uninterrupted; with the bytes each veth end carried during the run."""
    hosts = module_two_hosts
    run_dir = tmp_path_factory.mktemp("pp2") / "run"
    before = [hosts.link_stats(h) for h in (0, 1)]
    Job(hosts, demo_dir, run_dir, PP2).run()
    after = [hosts.link_stats(h) for h in (0, 1)]
    return run_dir, {"tx": [after[h]["tx_bytes"] - before[h]["tx_bytes"] for h in (0, 1)]}


@pytest.mark.timeout(400)
def test_pp2_one_stage_per_host_equals_one_process(pp2_run, reference, module_two_hosts):
    run_dir, traffic = pp2_run
    assert events(run_dir, "start")[0]["layout"] == "dp2 x tp1 x pp2 (4 ranks)"
    placed = rank_hosts(run_dir)
    stages_of = {h: {st for host, st in placed.values() if host == h} for h in module_two_hosts.hostname}
    assert sorted(map(sorted, stages_of.values())) == [[0], [1]], placed  # each host holds one whole stage
    assert_same_losses(run_dir, reference)
    assert not events(run_dir, "straggler")  # a healthy run flags no rank
    # The hosts talked over the veth pair: activations, their gradients and the step's reductions (tens of kB
    # per microbatch each way at the least), and nothing else could carry it: a host has only lo and the veth,
    # and one route, the veth's subnet.
    print(f"bytes each host sent over the veth during the run: {traffic['tx']}")
    assert min(traffic["tx"]) > 200_000, traffic
    for h in (0, 1):
        assert sorted(module_two_hosts.interfaces(h)) == sorted(["lo", IFNAME])
        assert [(r["dst"], r["dev"]) for r in module_two_hosts.routes(h)] == [("10.77.0.0/24", IFNAME)]


@pytest.fixture(scope="module")
def dp2_tp2_run(module_two_hosts, demo_dir, tmp_path_factory) -> tuple[Path, Job]:
    """dp2 x tp2 over the two hosts, with rank 3 made slow (it burns 1 s of CPU per step)."""
    run_dir = tmp_path_factory.mktemp("dp2tp2") / "run"
    job = Job(module_two_hosts, demo_dir, run_dir, DP2_TP2, **slow_rank_env(SLOW_RANK, 1.0))
    job.run()
    return run_dir, job


@pytest.mark.timeout(400)
def test_dp2_tp2_tp_inside_a_host_equals_one_process(dp2_tp2_run, reference):
    run_dir, _ = dp2_tp2_run
    assert events(run_dir, "start")[0]["layout"] == "dp2 x tp2 x pp1 (4 ranks)"
    placed = rank_hosts(run_dir)
    assert placed[0][0] == placed[1][0] != placed[2][0] == placed[3][0], placed  # tp pairs inside a host
    assert_same_losses(run_dir, reference)


@pytest.mark.timeout(400)
def test_straggler_check_names_the_slow_rank_and_its_host(dp2_tp2_run):
    run_dir, job = dp2_tp2_run
    checks, flagged = events(run_dir, "straggler_check"), events(run_dir, "straggler")
    slow_host = rank_hosts(run_dir)[SLOW_RANK][0]
    assert [c["step"] for c in checks] == [3, 6]
    for c in checks:
        assert (c["slowest_rank"], c["slowest_host"]) == (SLOW_RANK, slow_host), c
        assert c["ratio"] > c["threshold"] == 1.5
    # Flagged in both windows, and no other rank: the 1 s it burns per step is its compute.
    assert [(f["step"], f["rank"], f["host"], f["cause"]) for f in flagged] == [
        (3, SLOW_RANK, slow_host, "compute"), (6, SLOW_RANK, slow_host, "compute")]
    assert all(f["compute_s"] >= 1.0 for f in flagged)
    # The console warning, written by rank 0 on its host.
    warning = f"straggler: rank {SLOW_RANK} on host {slow_host} is"
    assert any(warning in job.log(h) for h in (0, 1)), job.tails()


@pytest.mark.timeout(400)
def test_host_killed_and_replaced_resumes_with_the_same_losses(two_hosts, demo_dir, pp2_run, tmp_path):
    """kill -9 of every process of host 1 once step 3 is logged; then its agent is started again (a repaired or
    replacement node running the job's command). Host 0's agent restarts its workers (MAX_RESTARTS=1) into the
    new rendezvous round; the job resumes from the latest complete checkpoint."""
    run_dir = tmp_path / "run"
    # parallel.timeout_s=30: a restarted worker group that cannot form fails in 30 s, not the recipe's 120.
    job = Job(two_hosts, demo_dir, run_dir, [*PP2, "parallel.timeout_s=30"], MAX_RESTARTS="1", RDZV_TIMEOUT="120")
    job.start(0)
    job.start(1)
    job.wait_for_step(3, timeout=240)
    killed = two_hosts.kill(1)
    assert killed and not two_hosts.pids(1)
    job.wait(1, 10)  # the agent's process is gone
    job.start(1)
    assert job.wait(0, 240) == 0, job.tails()
    assert job.wait(1, 60) == 0, job.tails()
    starts = events(run_dir, "start")
    assert len(starts) == 2 and starts[1]["resumed_from"] is not None, starts
    assert starts[1]["step"] in (2, 4)  # the latest complete checkpoint when the host died
    ref, got = step_records(pp2_run[0]), step_records(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert [got[s]["loss"] for s in got] == [ref[s]["loss"] for s in got]  # bitwise: exact resume, same layout


@pytest.mark.timeout(300)
def test_host_that_never_returns_fails_the_job_within_the_timeouts(two_hosts, demo_dir, tmp_path):
    """Host 1 loses power once step 3 is logged (its link goes down, then its processes die: host 0 never sees
    a connection reset). Host 0's workers time out after parallel.timeout_s, its agent restarts them and waits
    RDZV_TIMEOUT for host 1 to rejoin, then fails: a clear error within the sum, not a hang."""
    timeout_s, rdzv_timeout = 20, 15
    run_dir = tmp_path / "run"
    job = Job(two_hosts, demo_dir, run_dir, [*DP2_TP2, f"parallel.timeout_s={timeout_s}"], MAX_RESTARTS="1",
              RDZV_TIMEOUT=str(rdzv_timeout))
    job.start(0)
    job.start(1)
    job.wait_for_step(3, timeout=240)
    t0 = time.monotonic()
    two_hosts.link_down(1)
    two_hosts.kill(1)
    rc = job.wait(0, timeout_s + rdzv_timeout + 120)
    elapsed = time.monotonic() - t0
    print(f"host 0 failed {elapsed:.1f}s after host 1 lost power")
    log = job.log(0)
    assert rc != 0, job.tails()
    # Start-up slack: the restart itself and torchrun's polling; a hang would run into the wait above.
    # (A collective that began just before the power loss times out a little under timeout_s after it.)
    assert timeout_s - 5 <= elapsed <= timeout_s + rdzv_timeout + 45, (elapsed, job.tails())
    assert "Timed out" in log or "timed out" in log, job.tails()  # the workers' collective timeout
    assert "RendezvousTimeoutError" in log, job.tails()  # the agent gave up waiting for host 1
    assert logged_step(run_dir) < 6
