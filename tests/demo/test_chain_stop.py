"""A stop signal (Ctrl-C, SIGTERM) during a stage of the demo's chain stops the chain: the stage saved its
checkpoint, and the next stage must not start from that interrupted one (it did: the chain went on)."""

from __future__ import annotations

import pytest

import train.trainer
from demo.chain import run_chain
from train.trainer import TrainResult


def test_a_signal_stops_the_chain(tmp_path, monkeypatch):
    ran: list[str] = []

    def fake_run(cfg):
        ran.append(cfg.run_dir)
        return TrainResult(run_dir=tmp_path, final_step=3, final_loss=None, checkpoint=None, stop_reason="signal",
                           stop_signal=2)

    monkeypatch.setattr(train.trainer, "run", fake_run)
    monkeypatch.setenv("LEARN_DIR", str(tmp_path))  # run_chain sets it; restored after the test
    said: list[str] = []
    with pytest.raises(SystemExit) as stop:
        run_chain(tmp_path, {1: 5, 2: 5, 3: 5}, print_fn=said.append)
    assert stop.value.code == 130
    assert ran == [str(tmp_path / "stage1")]
    assert "stage 1 stopped by a signal at step 3" in said[-1] and "the chain stops here" in said[-1]
