"""The lines python -m train ends with (issue 23): the final loss rounded, a finished run_dir that had nothing to
train said as such (it printed `final loss None, in 0s`), and a hub id as model.init_from answered with where
models come from."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_helpers import RECIPES, REPO, env_for

from core.config import ConfigError
from train.__main__ import _done_line
from train.start import Weights
from train.trainer import TrainResult


def test_done_line_rounds_the_loss_and_says_when_nothing_trained(tmp_path):
    ran = TrainResult(run_dir=tmp_path, final_step=20, final_loss=11.13884589012633, checkpoint=tmp_path / "c",
                      losses=[11.5, 11.13884589012633], elapsed_s=83.0)
    line = _done_line(ran)
    assert line.startswith("done: completed at step 20, final loss 11.1388, in ") and "11.13884" not in line
    idle = TrainResult(run_dir=tmp_path, final_step=20, final_loss=None, checkpoint=tmp_path / "c", losses=[])
    line = _done_line(idle)
    assert line.startswith(f"done: nothing to train: {tmp_path} already holds the final checkpoint of step 20")
    assert "pick a new run_dir" in line and "None" not in line


def test_hub_id_as_init_from_says_models_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model.init_from='Qwen/Qwen2-VL-2B-Instruct': no such directory here .*"
                                          r"Models are read from local directories.*`huggingface-cli download "
                                          r"Qwen/Qwen2-VL-2B-Instruct --local-dir DIR`.*`hf download"):
        Weights.at("Qwen/Qwen2-VL-2B-Instruct")
    (tmp_path / "Qwen" / "Qwen2-VL-2B-Instruct").mkdir(parents=True)  # a local directory of that name: its own error
    with pytest.raises(ConfigError, match="not an HF directory and no complete checkpoint"):
        Weights.at("Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.timeout(300)
def test_hub_id_is_one_line_from_the_cli(demo_dir, tmp_path):
    res = subprocess.run([sys.executable, "-m", "train", str(RECIPES / "stage2.yaml"), f"run_dir={tmp_path / 'r'}",
                          "model.init_from=Qwen/Qwen2-VL-2B-Instruct"], env=env_for(demo_dir), cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("config error: model.init_from='Qwen/Qwen2-VL-2B-Instruct': no such directory")
    assert "hf download Qwen/Qwen2-VL-2B-Instruct --local-dir DIR" in lines[0]
