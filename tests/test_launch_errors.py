"""A mistake in a recipe stays one line under the launchers (issue 23): under `torchrun --nproc-per-node 2` rank 0
prints it once and rank 1 stays quiet; launch/torchrun.sh and launch/deepspeed.sh repeat it as the last line of
their output, after the launcher's own report, and exit with the trainer's code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import read_error_line, report_error_line

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny/stage1.yaml"
LINE = "config error: unknown config key 'optim.lrr' (did you mean 'lr'?)"


SLOW_STDERR = """
import os, sys, time

class _SlowStderr:
    def __init__(self, f):
        self.f = f

    def write(self, s):
        if "config error" in s:
            time.sleep(6.0)
        return self.f.write(s)

    def __getattr__(self, name):
        return getattr(self.f, name)

if os.environ.get("RANK") == "0":
    sys.stderr = _SlowStderr(sys.stderr)
"""


def _run(cmd: list[str], **env: str) -> tuple[int, list[str]]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHON": sys.executable, **env}
    full_env.pop("QWEN2VL_ERROR_FILE", None)
    res = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    return res.returncode, [x for x in res.stdout.splitlines() if x.strip()]


@pytest.mark.distributed
@pytest.mark.parametrize("slow_rank0", [False, True])
def test_torchrun_two_ranks_print_the_line_once(tmp_path, slow_rank0):
    """Also when rank 0 prints last: torchrun stops the other workers once one exits, so rank 1 must leave rank 0
    the time to print (here rank 0's stderr takes 6 s to write the line, through a sitecustomize on PYTHONPATH)."""
    env = {}
    if slow_rank0:
        (tmp_path / "sitecustomize.py").write_text(SLOW_STDERR)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    rc, lines = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                      "-m", "train", RECIPE, "optim.lrr=1"], **env)
    assert rc != 0
    hits = [x for x in lines if LINE in x]
    assert len(hits) == 1 and hits[0].startswith(LINE), lines  # rank 0's line; rank 1 said nothing
    assert "Traceback" in "\n".join(lines)  # plain torchrun still adds its ChildFailedError report after it


@pytest.mark.distributed
@pytest.mark.parametrize("script,env", [("torchrun.sh", {"NPROC_PER_NODE": "2"}), ("deepspeed.sh", {"NUM_GPUS": "2"})])
def test_launch_scripts_end_with_the_line(script, env):
    rc, lines = _run(["bash", f"launch/{script}", RECIPE, "optim.lrr=1"], **env)
    assert rc == 2, lines[-20:]  # the trainer's exit code for a recipe mistake, not the launcher's 1
    assert lines[-1].startswith(LINE), lines[-20:]
    assert "Traceback" not in "\n".join(lines) and "ChildFailedError" not in "\n".join(lines), lines


def test_error_file_keeps_the_lowest_ranks_latest_line(tmp_path, monkeypatch):
    path = tmp_path / "errors.txt"
    monkeypatch.setenv("QWEN2VL_ERROR_FILE", str(path))
    report_error_line("rank one's\nline", 1)
    assert read_error_line(path) == "rank one's line"  # one line, even from a multi-line message
    report_error_line("first", 0)
    report_error_line("after a restart", 0)
    report_error_line("later rank", 3)
    assert read_error_line(path) == "after a restart"
    assert read_error_line(tmp_path / "absent.txt") is None
