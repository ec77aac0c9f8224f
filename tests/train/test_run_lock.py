"""One training per run directory (issue 22): the lock's rules one by one (train/run_lock.py), then real runs:
two trainings started together on one run_dir (before: both exited 0 and the first's result was overwritten),
a run killed with SIGKILL and started again, a torchrun job whose rank 0 is killed and restarted, and every rank
of a job refused together."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from train_helpers import RECIPES, REPO, env_for, step_records, trainer_pid

import train.run_lock as rl
from train.run_lock import LOCK_NAME, RunDirLocked, acquire_run_lock, lock_dir, this_holder


def _plant(d: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock file as another process would have left it (its heartbeat `age_s` old)."""
    d.mkdir(parents=True, exist_ok=True)
    holder = replace(this_holder(), **fields)
    path = d / LOCK_NAME
    path.write_text(json.dumps(asdict(holder)))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield p
    p.kill()
    p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------ the rules
def test_lock_file_names_the_holder_and_is_released(tmp_path):
    lk = lock_dir(tmp_path / "run")
    d = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert d["pid"] == os.getpid() and d["host"] == os.uname().nodename and d["token"]
    lk.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    lk.release()  # idempotent


def test_a_live_holder_refuses_naming_it(tmp_path, sleeper):
    _plant(tmp_path, pid=sleeper.pid, pid_start=rl._pid_start(sleeper.pid), host="gpu-node-7")
    with pytest.raises(RunDirLocked, match=rf"in use by another training: pid {sleeper.pid} on host gpu-node-7.*"
                                           r"choose another run_dir"):
        lock_dir(tmp_path)


def test_a_dead_pid_on_this_machine_is_taken_over(tmp_path, caplog):
    pid = _dead_pid()
    _plant(tmp_path, pid=pid, pid_start=12345)
    with caplog.at_level("WARNING", logger="train.run_lock"):
        lk = lock_dir(tmp_path)
    assert lk.holder.pid == os.getpid() and f"pid {pid}" in caplog.text and "its process is gone" in caplog.text
    lk.release()


def test_a_reused_pid_is_not_the_holder(tmp_path, sleeper):
    _plant(tmp_path, pid=sleeper.pid, pid_start=rl._pid_start(sleeper.pid) + 1)  # the PID's first owner is gone
    lock_dir(tmp_path).release()


def test_another_host_is_judged_by_its_heartbeat(tmp_path):
    _plant(tmp_path, machine="another-boot/pid:[1]", host="node-b", pid=1, age_s=rl.STALE_AFTER_S - 30)
    with pytest.raises(RunDirLocked, match=r"pid 1 on host node-b.*heartbeat \d+ s ago"):
        lock_dir(tmp_path)
    _plant(tmp_path, machine="another-boot/pid:[1]", host="node-b", pid=1, age_s=rl.STALE_AFTER_S + 30)
    lock_dir(tmp_path).release()


@pytest.mark.parametrize("job,attempt,taken", [
    ("torchrun:abc", [0, 0], True),  # restart 1 of the same torchrun job takes over rank 0's lock from host b
    ("torchrun:abc", [0, 1], False),  # the same attempt twice: two trainings, not a restart
    ("torchrun:other", [0, 0], False),
    (None, [0, 0], False),
])
def test_a_restart_of_the_same_job_takes_over_a_fresh_lock(tmp_path, monkeypatch, job, attempt, taken):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    _plant(tmp_path, machine="another-boot/pid:[1]", host="node-b", pid=1, job=job, attempt=attempt)
    if taken:
        lock_dir(tmp_path).release()
    else:
        with pytest.raises(RunDirLocked, match="node-b"):
            lock_dir(tmp_path)


def test_the_job_ids_of_slurm_and_torchrun(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default without --rdzv-id: not an identity
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert rl._job()[0] is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert rl._job() == ("slurm:4242", [2, 0])


def test_the_heartbeat_refreshes_and_a_lost_lock_is_not_removed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rl, "HEARTBEAT_S", 0.05)
    lk = lock_dir(tmp_path)
    path = tmp_path / LOCK_NAME
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > time.time() - 60  # touched by the heartbeat thread
    other = _plant(tmp_path, machine="another-boot/pid:[1]", pid=1, host="node-b")  # taken over elsewhere
    with caplog.at_level("ERROR", logger="train.run_lock"):
        time.sleep(0.3)
    assert "no longer this run's" in caplog.text
    lk.release()
    assert other.exists()  # release never removes another run's lock


def test_checkpoint_dir_outside_the_run_dir_is_locked_too(tmp_path):
    locks = acquire_run_lock([tmp_path / "run", tmp_path / "run" / "checkpoints"], is_main=True)
    assert [lk.path for lk in locks] == [(tmp_path / "run" / LOCK_NAME).resolve()]
    rl.release_run_lock(locks)
    locks = acquire_run_lock([tmp_path / "run", tmp_path / "ckpts"], is_main=True)
    assert len(locks) == 2 and (tmp_path / "ckpts" / LOCK_NAME).exists()
    with pytest.raises(RunDirLocked):  # the second directory held: nothing is kept
        _plant(tmp_path / "ckpts2", pid=os.getppid(), pid_start=rl._pid_start(os.getppid()))
        acquire_run_lock([tmp_path / "run2", tmp_path / "ckpts2"], is_main=True)
    assert not (tmp_path / "run2" / LOCK_NAME).exists()
    rl.release_run_lock(locks)


def test_breaking_a_stale_lock_spares_one_taken_meanwhile(tmp_path, sleeper):
    """The race two contenders run: both judge the same lock stale; the first breaks it and takes the directory;
    the second's break must then leave the first's (new, live) lock alone."""
    path = _plant(tmp_path, pid=_dead_pid(), pid_start=1)
    seen, _ = rl._read_lock(path)
    _plant(tmp_path, pid=sleeper.pid, pid_start=rl._pid_start(sleeper.pid))  # the first contender's lock
    rl._break(path, seen)
    assert path.exists() and json.loads(path.read_text())["pid"] == sleeper.pid
    with pytest.raises(RunDirLocked, match=f"pid {sleeper.pid}"):
        lock_dir(tmp_path)


def _contend(d: str, go, results, hold) -> None:
    go.wait()
    try:
        lock_dir(d)
        results.put("won")
    except RunDirLocked:
        results.put("refused")
    hold.wait(30)  # keep the PID alive until every contender has tried


@pytest.mark.timeout(120)
def test_contenders_for_a_stale_lock_one_wins(tmp_path):
    _plant(tmp_path, pid=_dead_pid(), pid_start=1)
    ctx = mp.get_context("fork")
    go, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), go, results, hold)) for _ in range(6)]
    for p in procs:
        p.start()
    go.set()
    got = sorted(results.get(timeout=60) for _ in procs)
    hold.set()
    for p in procs:
        p.join(30)
    assert got == ["refused"] * 5 + ["won"]


# ------------------------------------------------------------------------------------------ real runs
COMMON = ["model.init_from=null", "optim.warmup_steps=1", "data.max_tokens=160", "data.num_workers=0",
          "checkpoint.keep_last=0"]


def _train(run_dir: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", str(RECIPES / "stage3.yaml"), f"run_dir={run_dir}",
                             *COMMON, *extra], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _error_lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x
            and " WARNING " not in x and " INFO " not in x]


@pytest.mark.timeout(400)
def test_two_trainings_started_together_one_refuses_naming_the_other(demo_dir, tmp_path):
    run_dir = tmp_path / "shared"
    env = env_for(demo_dir)
    a = _train(run_dir, env, "train.steps=6", "checkpoint.every=1")
    time.sleep(1.0)
    b = _train(run_dir, env, "train.steps=6", "checkpoint.every=1")
    (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.returncode, err_a[-3000:], b.returncode, err_b[-3000:])
    winner, err = (a, err_b) if a.returncode == 0 else (b, err_a)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"is in use by another training: pid {winner.pid} on host {os.uname().nodename}" in lines[0], lines[0]
    assert lines[0].startswith("config error: run_dir ")
    assert sorted(step_records(run_dir)) == [1, 2, 3, 4, 5, 6] and not (run_dir / LOCK_NAME).exists()


@pytest.mark.timeout(400)
def test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over(demo_dir, tmp_path):
    run_dir = tmp_path / "killed"
    env = env_for(demo_dir, QWEN2VL_LOCK_TEST="kill9")
    p = _train(run_dir, env, "train.steps=200", "checkpoint.every=2")
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "latest").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    pid = trainer_pid(str(run_dir), QWEN2VL_LOCK_TEST="kill9")
    assert pid == p.pid and json.loads((run_dir / LOCK_NAME).read_text())["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert (run_dir / LOCK_NAME).exists()  # nothing released it
    again = _train(run_dir, env, "train.steps=4", "checkpoint.every=2")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"taking over the lock {run_dir / LOCK_NAME} of pid {pid}" in err and "its process is gone" in err
    assert not (run_dir / LOCK_NAME).exists()


def _torchrun(run_dir: Path, env: dict, *extra: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", "-m", "train", str(RECIPES / "stage3.yaml"), f"run_dir={run_dir}", *COMMON,
           *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(600)
def test_torchrun_restart_after_rank0_is_killed_takes_over_and_others_are_refused(demo_dir, tmp_path):
    """dp2 under torchrun --max-restarts 1: both ranks share rank 0's lock; a second training on the run_dir is
    refused while the job runs; rank 0 is killed with SIGKILL, torchrun restarts the job (new PIDs, same run id),
    which takes the lock over and finishes."""
    run_dir = tmp_path / "tr"
    env = env_for(demo_dir, QWEN2VL_LOCK_TEST="torchrun")
    job = _torchrun(run_dir, env, "train.steps=8", "checkpoint.every=2", restarts=1)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "latest").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.2)
        rank0 = trainer_pid(str(run_dir), QWEN2VL_LOCK_TEST="torchrun", RANK="0")
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        assert holder["pid"] == rank0 and holder["job"].startswith("torchrun:") and holder["attempt"] == [0, 0]
        other = _train(run_dir, env_for(demo_dir), "train.steps=8")
        _, err = other.communicate(timeout=200)
        assert other.returncode == 2 and f"pid {rank0} on host" in err and holder["job"] in err, err[-3000:]
        os.kill(rank0, signal.SIGKILL)
        _, err = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-5000:]
    starts = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in starts if r.get("event") == "start"]
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["resumed_from"]
    assert max(step_records(run_dir)) == 8 and not (run_dir / LOCK_NAME).exists()


@pytest.mark.timeout(300)
def test_every_rank_of_a_job_is_refused_together(demo_dir, tmp_path):
    """The lock is held by this test process: rank 0 learns it, rank 1 through the process group; both exit 2
    without a hang, rank 0 printing the one line."""
    run_dir = tmp_path / "held"
    lk = lock_dir(run_dir)
    try:
        job = _torchrun(run_dir, env_for(demo_dir), "train.steps=4")
        _, err = job.communicate(timeout=240)
    finally:
        lk.release()
    assert job.returncode != 0
    assert f"config error: run_dir {run_dir} is in use by another training: pid {os.getpid()}" in err, err[-4000:]
    log = (run_dir / "train.log").read_text()
    assert "[rank1] ERROR train: config error: run_dir" in log and "in use by another training" in log, log[-3000:]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
