"""Where a run starts (train/start.py find_resume), in one process on small real checkpoints: resume=never with
and without checkpoints, auto taking the newest that verifies (passing over damaged ones with a warning each),
auto with only damaged step directories, and an explicit path. (The same decisions through the Trainer and the
CLI: tests/train/test_faults.py; this file is what the mutation check's `resume` target runs, tests/mutation.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from parallel import ParallelConfig, init_distributed
from train.checkpoint import CheckpointManager, Layout
from train.config import load_config
from train.start import find_resume

DATA = ["data.tokenizer=/tok", "data.datasets=[{path: /d}]"]


def cfg(run_dir: Path, resume: str = "auto"):
    return load_config(None, [*DATA, f"run_dir={run_dir}", f"checkpoint.resume={resume}"])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run with complete, checksummed checkpoints at steps 1, 2 and 3."""
    init_distributed(ParallelConfig())
    d = tmp_path / "run"
    m = CheckpointManager(d / "checkpoints", Layout(), keep_last=0)
    for step in (1, 2, 3):
        m.save(step, {"model.w": torch.full((4, 4), float(step))}, "")
    return d


def manager(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(run_dir / "checkpoints", Layout(), keep_last=0)


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step_{n:08d}"


def _damage(path: Path) -> Path:
    victim = next(path.glob("*.distcp"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return victim


def test_never_starts_fresh_and_refuses_a_run_with_checkpoints(run_dir, tmp_path):
    empty = tmp_path / "empty"
    assert find_resume(cfg(empty, "never"), manager(empty), True) is None
    with pytest.raises(ConfigError) as e:
        find_resume(cfg(run_dir, "never"), manager(run_dir), True)
    # The whole line, its fix included (what a user acts on).
    assert str(e.value) == (f"checkpoint.resume=never but {run_dir / 'checkpoints'} already holds step_00000003: "
                            "use a new run_dir / checkpoint.dir, or checkpoint.resume=auto to continue it")


def test_auto_takes_the_newest_verified_and_warns_for_each_passed_over(run_dir, tmp_path, caplog):
    empty = tmp_path / "empty"
    assert find_resume(cfg(empty), manager(empty), True) is None  # nothing to resume: a fresh start
    assert find_resume(cfg(run_dir), manager(run_dir), True) == step(run_dir, 3)
    v3, v2 = _damage(step(run_dir, 3)), _damage(step(run_dir, 2))
    caplog.set_level("WARNING")
    assert find_resume(cfg(run_dir), manager(run_dir), True) == step(run_dir, 1)
    passed_over = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert len(passed_over) == 2 and v3.name in passed_over[0] and "step_00000003" in passed_over[0]
    assert "step_00000002" in passed_over[1] and v2.name in passed_over[1]
    assert all(re.fullmatch(r"checkpoint \S*step_0000000[23]\S* .* -- it fails verification and is passed over", m,
                            flags=re.S) for m in passed_over), passed_over
    assert [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()] == [
        "resuming from step_00000001, the newest checkpoint that verifies"]
    caplog.clear()
    assert find_resume(cfg(run_dir), manager(run_dir), False) == step(run_dir, 1)  # only rank 0 warns
    assert caplog.text == ""


def test_auto_with_only_damaged_steps_is_an_error(run_dir):
    manager(run_dir).save(4, {"model.w": torch.full((4, 4), 4.0)}, "")
    for n in (1, 2, 3, 4):
        _damage(step(run_dir, n))
    with pytest.raises(ConfigError) as e:
        find_resume(cfg(run_dir), manager(run_dir), True)
    # The newest three are named (a long run's list stays one line), then the two ways out.
    assert str(e.value) == (
        f"{run_dir / 'checkpoints'} holds step directories (step_00000002, step_00000003, step_00000004) but none "
        "is a complete, verified checkpoint: restore the files (each step's meta.json lists them with their "
        "checksums), or set checkpoint.resume=never to start over from model.init_from")


def test_an_explicit_path_must_verify(run_dir):
    assert find_resume(cfg(run_dir, str(step(run_dir, 2))), manager(run_dir), True) == step(run_dir, 2)
    # A checkpoint directory names its newest complete step.
    assert find_resume(cfg(run_dir, str(run_dir / "checkpoints")), manager(run_dir), True) == step(run_dir, 3)
    victim = _damage(step(run_dir, 2))
    with pytest.raises(ConfigError, match=rf"checkpoint.resume=.*step_00000002 is damaged: .*{victim.name}"):
        find_resume(cfg(run_dir, str(step(run_dir, 2))), manager(run_dir), True)
    # Several problems: each named, '; ' between them, in one line.
    meta = step(run_dir, 2) / ".metadata"
    meta.write_bytes(meta.read_bytes()[:2])
    problems = manager(run_dir).verify(step(run_dir, 2))
    assert len(problems) == 2
    with pytest.raises(ConfigError) as e:
        find_resume(cfg(run_dir, str(step(run_dir, 2))), manager(run_dir), True)
    s2 = step(run_dir, 2)
    assert str(e.value) == f"checkpoint.resume={s2}: {s2} is damaged: " + "; ".join(problems)
