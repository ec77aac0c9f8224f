"""The short learning check (CI): `python -m demo` with a fixed seed runs stage 1 -> 2 -> 3 of
recipes/learn/ on the real-data set and must answer held-out questions far above chance, so a regression in
labels, masks, M-RoPE positions, the stage hand-off or freezing breaks CI. The full check, with the 90% / 80%
goals and the stage ablations, is benchmarks/learning_check.py (docs/learning.md).

Held-out: digits 1500..1796 (never in any training sample; 10 classes, chance 10%) and videos of those digits
moving left/right/up/down (4 classes, chance 25%), scored by the in-training greedy-generation eval.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.family import config_from_hf_dict, get_family
from model.vlm import VLModel
from tests.train.train_helpers import REPO
from tools.eval import load_for_eval
from tools.report import load_run
from train.checkpoint import read_meta, resolve_checkpoint

# The demo's schedule (demo.chain.DEMO_STEPS) and floors well above chance (10% digits, 25% directions). With
# this seed it measured 55% / 55% (docs/learning.md); the floors leave room for another CPU's float rounding.
EVAL_SAMPLES = 100
MIN_DIGITS, MIN_VIDEOS = 0.30, 0.40


_group = get_family("qwen2_vl").group_of


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_for_eval(run_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(900)
def test_three_stages_learn_heldout_digits_and_directions(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "demo", "--workdir", str(work), "--eval-samples", str(EVAL_SAMPLES),
           "--threads", "1", "--seed", "0", "--no-export"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=860)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    assert f"Report (plots + index): {work / 'report' / 'index.md'}" in res.stdout
    assert (work / "report" / "eval.png").is_file()

    ev = {s: load_run(work / f"stage{s}").final_evals() for s in (1, 2, 3)}
    for s in (1, 2, 3):  # every stage ends with an evaluation of both held-out sets
        assert {"digits", "videos", "captions"} <= set(ev[s]), ev[s]
        assert ev[s]["digits"]["n"] == EVAL_SAMPLES and ev[s]["videos"]["n"] == EVAL_SAMPLES
    digits, videos = ev[3]["digits"]["exact"], ev[3]["videos"]["exact"]
    assert digits >= MIN_DIGITS and videos >= MIN_VIDEOS, (digits, videos, res.stdout[-3000:])
    # Before any chat training (stages 1-2) nothing answers in the ChatML format; stage 3 is what makes it.
    assert ev[3]["digits"]["exact"] > ev[2]["digits"]["exact"]
    # Stage 2 (everything trains on captions) brings the held-out caption loss far below stage 1's.
    assert ev[2]["captions"]["loss"] < ev[1]["captions"]["loss"]

    # Freezing along the chain: stage 1 leaves the LLM at its seeded random init, stage 3 leaves stage 2's ViT.
    w1, w2, w3 = (_weights(work / f"stage{s}") for s in (1, 2, 3))
    torch.manual_seed(0)  # train.seed: the trainer's full random init of stage 1
    init = VLModel(config_from_hf_dict(read_meta(resolve_checkpoint(work / "stage1"))["model_config"]))
    init_sd = init.state_dict()
    for k, v in w1.items():
        if _group(k) == "llm":
            assert torch.equal(v, init_sd[k]), f"stage 1 changed frozen {k}"
    assert any(not torch.equal(v, init_sd[k]) for k, v in w1.items() if _group(k) == "vision")
    for k, v in w3.items():
        if _group(k) == "vision":
            assert torch.equal(v, w2[k]), f"stage 3 changed frozen {k}"
    assert any(not torch.equal(v, w2[k]) for k, v in w3.items() if _group(k) == "llm")
