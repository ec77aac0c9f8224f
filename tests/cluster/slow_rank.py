"""A rank on a slow device, for the cluster tests: QWEN2VL_SLOW_RANK="RANK:SECONDS" makes that global rank burn
SECONDS of CPU in every train step, inside the straggler monitor's timing (train/straggler.py), as a slow device
would.

It lives with the tests and the training code knows nothing of it: a trainer process gets it from
slow_rank_hook/sitecustomize.py, which Python runs at start-up when that folder is on PYTHONPATH (slow_rank_env()
puts it there, for launchers that start `python -m train` themselves, like torchrun).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SLOW_RANK_ENV = "QWEN2VL_SLOW_RANK"
HOOK_DIR = Path(__file__).resolve().parent / "slow_rank_hook"
REPO = Path(__file__).resolve().parents[2]


def parse_slow_rank(value: str | None) -> tuple[int, float] | None:
    """QWEN2VL_SLOW_RANK="RANK:SECONDS" -> (rank, seconds); unset or empty -> None."""
    if not value:
        return None
    try:
        rank, seconds = value.split(":")
        return int(rank), float(seconds)
    except ValueError:
        raise ValueError(f"{SLOW_RANK_ENV}={value!r}: expected RANK:SECONDS, e.g. 3:0.5") from None


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def slow_rank_env(rank: int, seconds: float) -> dict[str, str]:
    """Environment variables that make global rank `rank` of a training job burn `seconds` of CPU per step."""
    path = [str(HOOK_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {SLOW_RANK_ENV: f"{rank}:{seconds}", "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def install() -> None:
    """In a trainer process whose RANK is the slow one: every Trainer.train_step burns the seconds after the step."""
    slow = parse_slow_rank(os.environ.get(SLOW_RANK_ENV))
    if slow is None or os.environ.get("RANK") != str(slow[0]):
        return
    from train.trainer import Trainer

    step = Trainer.train_step

    def slow_step(self):
        out = step(self)
        burn_cpu(slow[1])
        return out

    Trainer.train_step = slow_step
