"""Every command line tool answers a user's mistake with one line and exit code 2 (no traceback), and --help
does what --help does (issue 13). The training CLI's own cases are in tests/train/test_faults.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cmd,match", [
    ([sys.executable, "-m", "data.inspect", "--data", "/nope/shards", "--tokenizer", "/nope/tok"],
     "python -m data.inspect: error: no tokenizer.json at '/nope/tok'"),
    ([sys.executable, "-m", "model.parity", "--hf", "/tmp/definitely-not-here"],
     "python -m model.parity: error: --hf /tmp/definitely-not-here: no HF checkpoint directory there (it needs "
     "config.json and *.safetensors)"),
    ([sys.executable, "-m", "tools.export", "/nope/run", "/tmp/out-never-written"],
     "python -m tools.export: error: no complete checkpoint at /nope/run"),
])
def test_wrong_paths_are_one_line_exit_2(cmd, match):
    res = _run(cmd)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(match), lines


@pytest.mark.parametrize("cmd,expect", [
    ([sys.executable, "-m", "train.config_doc", "--help"], "usage: python -m train.config_doc"),
    (["bash", "launch/deepspeed.sh", "--help"], "launch/deepspeed.sh RECIPE.yaml"),
    (["bash", "launch/torchrun.sh", "--help"], "launch/torchrun.sh RECIPE.yaml"),
    ([sys.executable, "-m", "train", "--help"], "data.datasets='[{path:"),
])
def test_help_is_help(cmd, expect):
    res = _run(cmd)
    assert res.returncode == 0 and expect in res.stdout, (res.stdout[-1500:], res.stderr[-1500:])
