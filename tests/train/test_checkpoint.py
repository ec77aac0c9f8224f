"""CheckpointManager: atomic publication, a crash mid-save leaves the previous checkpoint loadable, keep_last,
async saves, resolution of run dirs / checkpoint dirs / step dirs (one process, real DCP files)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from parallel import ParallelConfig, init_distributed
from train.checkpoint import (
    CheckpointManager,
    CheckpointSaveError,
    Layout,
    checkpoint_keys,
    latest_complete,
    list_complete,
    resolve_checkpoint,
)
from train.state import BlobState


@pytest.fixture(autouse=True)
def _pg():
    init_distributed(ParallelConfig())  # world size 1, idempotent


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model.w": torch.randn(8, 4, generator=g),
        "optim.w.exp_avg": torch.randn(8, 4, generator=g),
        "trainer": {"step": step, "skipped_steps": 0},
        "loader": BlobState("dp0", {"consumed": step * 3, "buffers": ["a/0", "a/1"]}),
    }


def blank() -> dict:
    return {"model.w": torch.zeros(8, 4), "optim.w.exp_avg": torch.zeros(8, 4),
            "trainer": {"step": 0, "skipped_steps": 0}, "loader": BlobState("dp0")}


def test_save_publish_and_load(tmp_path):
    m = CheckpointManager(tmp_path, Layout(), keep_last=0)
    m.save(3, state(3), "cfg: 1\n", {"model_config": {"x": 1}})
    p = tmp_path / "step_00000003"
    assert latest_complete(tmp_path) == p and (tmp_path / "latest").read_text().strip() == p.name
    meta = json.loads((p / "meta.json").read_text())
    assert meta["step"] == 3 and meta["layout"]["dp"] == 1 and meta["model_config"] == {"x": 1}
    assert (p / "config.yaml").read_text() == "cfg: 1\n"
    assert {"model.w", "trainer.step", "loader.dp0"} <= checkpoint_keys(p)
    got = blank()
    m.load(p, got)
    ref = state(3)
    assert torch.equal(got["model.w"], ref["model.w"]) and torch.equal(got["optim.w.exp_avg"], ref["optim.w.exp_avg"])
    assert got["trainer"] == {"step": 3, "skipped_steps": 0}
    assert got["loader"].value == {"consumed": 9, "buffers": ["a/0", "a/1"]}
    assert resolve_checkpoint(tmp_path) == p and resolve_checkpoint(tmp_path.parent / tmp_path.name) == p


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, Layout(), keep_last=0)
    m.save(2, state(2), "")
    # The next save dies after the shard files are written, before DCP's .metadata (a crash mid-save).
    real_finish = FileSystemWriter.finish

    def boom(self, *a, **k):
        raise OSError("disk vanished mid-save")

    monkeypatch.setattr(FileSystemWriter, "finish", boom)
    with pytest.raises(CheckpointSaveError, match=r"OSError: disk vanished mid-save; the previous checkpoint .*"
                                                  r"step_00000002 stays the latest"):
        m.save(4, state(4), "")
    monkeypatch.setattr(FileSystemWriter, "finish", real_finish)
    tmp = tmp_path / "step_00000004.tmp"
    assert tmp.is_dir() and any(tmp.glob("*.distcp"))  # partial shards exist ...
    assert latest_complete(tmp_path) == tmp_path / "step_00000002"  # ... but the latest is the previous one
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint(tmp)
    got = blank()
    m.load(latest_complete(tmp_path), got)
    assert torch.equal(got["model.w"], state(2)["model.w"])
    # The next save removes the stale partial directory.
    m.save(6, state(6), "")
    assert not tmp.exists() and [p.name for p in list_complete(tmp_path)] == ["step_00000002", "step_00000006"]


def test_crash_between_rename_and_latest_pointer(tmp_path):
    m = CheckpointManager(tmp_path, Layout(), keep_last=0)
    m.save(1, state(1), "")
    m.save(2, state(2), "")
    (tmp_path / "latest").write_text("step_00000001\n")  # as if the process died before replacing it
    assert latest_complete(tmp_path).name == "step_00000002"
    (tmp_path / "latest").unlink()
    assert latest_complete(tmp_path).name == "step_00000002"


def test_keep_last(tmp_path):
    m = CheckpointManager(tmp_path, Layout(), keep_last=2)
    for s in (1, 2, 3, 4):
        m.save(s, state(s), "")
    assert [p.name for p in list_complete(tmp_path)] == ["step_00000003", "step_00000004"]


def test_async_save_publishes_after_the_write(tmp_path):
    m = CheckpointManager(tmp_path, Layout(), keep_last=0, async_save=True)
    m.save(5, state(5), "")
    m.wait()
    p = tmp_path / "step_00000005"
    assert latest_complete(tmp_path) == p
    got = blank()
    m.load(p, got)
    assert torch.equal(got["model.w"], state(5)["model.w"])


def test_blob_values_round_trip_as_plain_data(tmp_path):
    m = CheckpointManager(tmp_path, Layout(), keep_last=0)
    obj = {"a": torch.arange(3), "b": [1, "x"], "c": (2, None)}
    m.save(1, {"blob": BlobState("k", obj)}, "")
    got = {"blob": BlobState("k")}
    m.load(tmp_path / "step_00000001", got)
    assert torch.equal(got["blob"].value["a"], obj["a"]) and got["blob"].value["b"] == [1, "x"]
    assert got["blob"].value["c"] == (2, None)
