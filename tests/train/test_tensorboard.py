"""metrics.tensorboard: true (train/tensorboard.py): the scalars of every step and evaluation land in
RUN_DIR/tensorboard, read back with TensorBoard's own event reader; a resumed writer replaces what an earlier
process logged past the checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_helpers import RECIPES, step_records

from train.config import load_config
from train.tensorboard import TensorBoardWriter
from train.trainer import run


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(300)
def test_steps_and_evals_reach_tensorboard(demo_dir, tmp_path):
    os.environ["DEMO_DIR"] = str(demo_dir)
    run_dir = tmp_path / "run"
    cfg = load_config(RECIPES / "stage3.yaml", [
        f"run_dir={run_dir}", "model.init_from=null", "train.steps=3", "checkpoint.every=0", "optim.warmup_steps=1",
        "data.max_tokens=160", "metrics.tensorboard=true", "eval.every=2", "eval.max_samples=2",
        "eval.max_new_tokens=2", f"eval.datasets=[{{path: {demo_dir / 'data' / 'heldout_digits'}, name: digits}}]"])
    run(cfg)
    got = read_scalars(run_dir / "tensorboard")
    recs = step_records(run_dir)
    assert [s for s, _ in got["loss"]] == [1, 2, 3]
    assert [v for _, v in got["loss"]] == pytest.approx([recs[s]["loss"] for s in (1, 2, 3)], rel=1e-6)
    assert [v for _, v in got["lr/llm"]] == pytest.approx([recs[s]["lr_groups"]["llm"] for s in (1, 2, 3)])
    assert {"grad_norm", "tokens_per_s", "flops_per_s", "data_wait_s", "lr/merger"} <= set(got)
    assert "lr/vision" not in got  # stage 3: the ViT is frozen
    assert [s for s, _ in got["eval/digits/loss"]] == [2, 3] and [s for s, _ in got["eval/digits/exact"]] == [2, 3]
    assert [v for _, v in got["eval/digits/n"]] == [2.0, 2.0]


def test_a_resumed_writer_replaces_the_steps_after_the_checkpoint(tmp_path):
    first = TensorBoardWriter(tmp_path)
    for step in (1, 2, 3, 4):  # the process that died after step 4 had checkpointed step 2
        first.scalars({"loss": 10.0 + step}, step)
    first.close()
    again = TensorBoardWriter(tmp_path, resumed_from=2)
    for step in (3, 4, 5):
        again.scalars({"loss": 20.0 + step}, step)
    again.close()
    assert read_scalars(tmp_path / "tensorboard")["loss"] == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0), (5, 25.0)]
