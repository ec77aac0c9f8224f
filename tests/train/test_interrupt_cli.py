"""Ctrl-C from a terminal signals the whole foreground process group: the training process and its forked loader
workers (issue 23: the saving warning was printed once per process). Under `python -m train` and under
launch/torchrun.sh (torchrun passes the signal on to its workers, which run in sessions of their own): one warning,
a checkpoint, exit code 130 and no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import RECIPES, REPO, env_for

WARNING = "SIGINT received: saving a checkpoint at the end of this step, then stopping"


def ctrl_c_after_first_step(cmd: list[str], run_dir: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start `cmd` as a terminal's foreground job (a session of its own), SIGINT its whole process group once a
    step is logged; (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any("loss" in json.loads(x) for x in metrics.read_text().splitlines()):
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


COMMON = ["model.init_from=null", "train.steps=40", "checkpoint.every=0", "data.max_tokens=160",
          "data.num_workers=1", "optim.warmup_steps=1"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["python", "launch/torchrun.sh"])
def test_ctrl_c_warns_once_saves_and_exits_130(demo_dir, tmp_path, launcher):
    run_dir = tmp_path / "run"
    args = [str(RECIPES / "stage3.yaml"), f"run_dir={run_dir}", *COMMON]
    env = env_for(demo_dir, PYTHON=sys.executable, NPROC_PER_NODE="2")
    cmd = [sys.executable, "-m", "train", *args] if launcher == "python" else ["bash", launcher, *args]
    rc, out = ctrl_c_after_first_step(cmd, run_dir, env)
    assert rc == 130, out[-4000:]
    assert out.count(WARNING) == 1, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    stop = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and saved[0] != "step_00000040", (saved, stop[-3:])  # stopped early, with a checkpoint
