"""Helpers for the cluster tests: `require` (fail under CI=true, else skip, when a system part is missing), the
recipe and overrides they all train, metrics.jsonl readers, finding a rank's trainer process, and the loss
comparison with its tolerance. (A uniquely named module: test files never import a conftest.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from train_helpers import RECIPES, step_records

RECIPE = str(RECIPES / "stage3.yaml")
# Stage 3 (ChatML: only assistant turns are supervised, so the 151,936-way LM head stays cheap), random init,
# 6 steps with a checkpoint every 2, a straggler check every 3 steps (it also reports each rank's host).
COMMON = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=0", "optim.warmup_steps=1",
          "data.max_tokens=160", "model.init_from=null", "metrics.straggler_every=3"]
# fp32 on both sides; what differs is the order of floating-point sums (dp gradient reduction, TP's split of
# each matmul's inner dimension), ~1e-7 relative per op, compounded over 6 AdamW steps. The same bound as the
# resume-across-layouts test (tests/train/test_distributed.py). Same data: the token counts must match exactly.
LOSS_REL = 1e-5


def require(reason: str | None) -> None:
    """Nothing when `reason` is None; else fail under CI=true (.ci/run installs everything these tests need, so
    a missing part there is a defect) and skip elsewhere, with the reason."""
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as tests/conftest.py's in_ci()
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def records(run_dir: Path) -> list[dict]:
    m = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in m.read_text().splitlines()] if m.is_file() else []


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == name]


def logged_step(run_dir: Path) -> int:
    """The highest step with a metrics record so far (0 before the first)."""
    return max((r["step"] for r in records(run_dir) if "loss" in r), default=0)


def assert_same_losses(got: Path, ref: Path, steps: int = 6) -> None:
    """Per step: the same tokens, and the loss within LOSS_REL."""
    a, b = step_records(got), step_records(ref)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert a[s]["tokens"] == b[s]["tokens"], s  # the same microbatches
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=LOSS_REL), s


def assert_resumed_exactly(run_dir: Path) -> None:
    """Every step logged by two attempts (before a failure, and again after the resume) has the same loss and
    gradient norm, bitwise."""
    seen: dict[int, dict] = {}
    again = 0
    for r in records(run_dir):
        if "loss" not in r:
            continue
        if r["step"] in seen:
            again += 1
            assert (r["loss"], r["grad_norm"]) == (seen[r["step"]]["loss"], seen[r["step"]]["grad_norm"]), r["step"]
        seen[r["step"]] = r
    assert again >= 1, "no step was logged before the failure and again after the resume"
