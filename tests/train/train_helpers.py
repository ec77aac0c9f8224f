"""Helpers for the training tests: paths, the short-stage overrides, launching `python -m train` under torchrun
with a per-call free port, and reading metrics.jsonl. (A uniquely named module: several test folders have a
conftest.py, so test files never import from `conftest`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "tiny"

# Short stages: 4 steps, a checkpoint every 2, one warmup step, 160-token microbatches (the LM head over the
# real 151,936-token vocabulary dominates a CPU step); everything else from the tiny recipes.
SHORT = ["train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1", "checkpoint.keep_last=0",
         "data.max_tokens=160"]


def env_for(demo_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DEMO_DIR=str(demo_dir), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def demo_config(demo_dir: Path, recipe: str | Path, overrides: list[str]):
    """load_config(recipe, overrides) with DEMO_DIR=demo_dir for the parse only: the recipes' ${DEMO_DIR} paths are
    resolved then, and no test leaves DEMO_DIR in this process's environment for the tests after it."""
    import pytest

    from train.config import load_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEMO_DIR", str(demo_dir))
        return load_config(recipe, overrides)


def run_cmd(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout[-6000:]}\n"
                             f"--- stderr\n{res.stderr[-8000:]}")
    return res


def torchrun(nproc: int, recipe: str, overrides: list[str], env: dict[str, str], timeout: float = 240,
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free rendezvous port per call) of `python -m train`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *(extra or []), "-m", "train", str(RECIPES / recipe), *overrides]
    return run_cmd(cmd, env, timeout)


def step_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl step records by step; a step logged again after a restart keeps its last record."""
    out: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:  # eval records carry a loss too
            out[rec["step"]] = rec
    return out


def losses(run_dir: Path) -> list[float]:
    recs = step_records(run_dir)
    return [recs[s]["loss"] for s in sorted(recs)]


def trainer_pid(marker: str | None = None, **env: str) -> int | None:
    """PID of the one `python -m train` process whose environment holds every KEY=VALUE of `env` (and whose
    command line contains `marker`, e.g. a unique run_dir, when given); not one of its DataLoader workers
    (forked children with the same command line and environment)."""
    found: dict[int, int] = {}
    want = [f"{k}={v}".encode() for k, v in env.items()]
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if marker is not None and not any(marker.encode() in c for c in cmd):
            continue
        if b"-m" in cmd and b"train" in cmd and all(w in environ for w in want):
            found[int(d.name)] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    return mains[0] if len(mains) == 1 else None
