"""launch/slurm.sbatch under a real SLURM on this machine (tests/cluster/slurm_cluster.py: munged, slurmctld and
slurmd with the test's own slurm.conf, stopped at the end): two tasks train the tiny recipe in CPU mode (one
`python -m train` per task, ranks from SLURM_PROCID); rank 1 is killed with SIGKILL in the first attempt, the
script requeues the job, and the second attempt resumes from the latest complete checkpoint and ends with the
losses of the one-process run."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
from cluster_helpers import (
    COMMON,
    RECIPE,
    assert_resumed_exactly,
    assert_same_losses,
    events,
    logged_step,
    require,
)
from slurm_cluster import LocalSlurm, unavailable_reason
from train_helpers import REPO, env_for, trainer_pid

pytestmark = pytest.mark.distributed


@pytest.fixture
def slurm(tmp_path):
    require(unavailable_reason())
    cluster = LocalSlurm(tmp_path / "slurm")
    try:
        cluster.__enter__()
    except (RuntimeError, OSError) as e:
        require(f"the one-machine SLURM did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(400)
def test_sbatch_two_tasks_requeue_after_a_failed_attempt_resumes(slurm, demo_dir, reference, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = env_for(demo_dir, PYTHON=sys.executable, MAX_REQUEUES="1", MASTER_PORT=str(_free_port()))
    # The template asks for 2 GPU nodes of 96 CPUs; the command line makes it 2 CPU tasks on this one node.
    job = slurm.sbatch(["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                        f"--output={out}", "--open-mode=append", "launch/slurm.sbatch", RECIPE, f"run_dir={run_dir}",
                        *COMMON], env, cwd=REPO)
    # First attempt: kill -9 rank 1's trainer once step 3 is logged (the checkpoint of step 2 is complete).
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline:
        if slurm.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        if logged_step(run_dir) >= 3:
            pid = trainer_pid(SLURM_JOB_ID=str(job), SLURM_PROCID="1")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.1)

    def log() -> str:
        return out.read_text() if out.is_file() else ""

    assert killed is not None, f"rank 1 was not found running at step 3\n{log()[-6000:]}"
    info = slurm.wait(job, 300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log()[-8000:])
    assert "requeueing job" in log() and "attempt 1 on" in log()
    starts = events(run_dir, "start")
    assert [s["layout"] for s in starts] == ["dp2 x tp1 x pp1 (2 ranks)"] * 2
    assert starts[0]["resumed_from"] is None and starts[1]["step"] in (2, 4), starts  # the latest complete one
    assert_resumed_exactly(run_dir)
    assert_same_losses(run_dir, reference)
