"""Multi-process CPU (gloo) runs of the real CLI, loader and engine on the demo's sample set:

- the tiny stage chain 1 -> 2 -> 3 with a different layout per stage (pp2; dp2 x tp2; tp2), hand-off by
  init_from across layouts, frozen groups bitwise unchanged;
- resume under a changed layout: tp2 -> pp2 (same dp: data exact, losses within float tolerance) and
  dp2 x tp2 -> tp2 (dp changed: continues with a new data pass);
- HF export of the stage-3 checkpoint: transformers loads it, `python -m model.parity` passes;
- the DeepSpeed launcher, and kill -9 of one rank under `torchrun --max-restarts 1`: the job restarts, resumes
  and ends with the same losses as the uninterrupted (deepspeed-launched) run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from train_helpers import RECIPES, REPO, SHORT, env_for, losses, run_cmd, step_records, torchrun, trainer_pid

from model.family import get_family, get_preset
from model.resolve import config_diff
from model.vlm import VLModel

pytestmark = pytest.mark.distributed

QWEN2 = get_family("qwen2_vl")


def ckpt_tensors(path: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    md = FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if k.startswith(prefix) and hasattr(v, "size")}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def events(run_dir: Path, name: str) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == name]


class Chain:
    """The three tiny stages, each run once per session, on demand."""

    def __init__(self, demo_dir: Path, root: Path) -> None:
        self.demo, self.root = demo_dir, root
        self.env = env_for(demo_dir)
        self._done: dict[int, Path] = {}

    def stage(self, n: int) -> Path:
        if n in self._done:
            return self._done[n]
        run_dir = self.root / f"s{n}"
        layout = {1: ["parallel.pp=2"], 2: ["parallel.tp=2", "parallel.dp=2"], 3: ["parallel.tp=2"]}[n]
        nproc = {1: 2, 2: 4, 3: 2}[n]
        # Stages 1 and 2 supervise every text token (pretraining samples): 2 steps each keep CI short.
        steps = [] if n == 3 else ["train.steps=2"]
        if n == 3:  # stage 3 saves asynchronously (what the cluster recipes do); its step-2 checkpoint is resumed
            steps.append("checkpoint.async_save=true")
        init = [f"model.init_from={self.stage(n - 1)}"] if n > 1 else []
        torchrun(nproc, f"stage{n}.yaml", [f"run_dir={run_dir}", *SHORT, *steps, *layout, *init], self.env,
                 timeout=400)
        self._done[n] = run_dir
        return run_dir


@pytest.fixture(scope="session")
def chain(demo_dir, tmp_path_factory) -> Chain:
    return Chain(demo_dir, tmp_path_factory.mktemp("chain"))


@pytest.mark.timeout(900)
def test_stage_chain_pp_then_dp_tp_then_tp(chain):
    s1, s2, s3 = chain.stage(1), chain.stage(2), chain.stage(3)
    for d, n in ((s1, 2), (s2, 2), (s3, 4)):
        assert sorted(step_records(d)) == list(range(1, n + 1)) and torch.isfinite(torch.tensor(losses(d))).all()
        assert (d / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"
    assert events(s1, "start")[0]["layout"] == "dp1 x tp1 x pp2 (2 ranks)"
    assert events(s2, "start")[0]["layout"] == "dp2 x tp2 x pp1 (4 ranks)"
    assert events(s3, "start")[0]["layout"] == "dp1 x tp2 x pp1 (2 ranks)"
    # Stages 2 and 3 learn (all groups / merger + LLM train).
    assert losses(s2)[-1] < losses(s2)[0] and losses(s3)[-1] < losses(s3)[0]
    # Stage 1 froze the LLM: its weights are still the seeded init (every rank builds the same full model).
    torch.manual_seed(0)
    init = VLModel(get_preset("qwen2_vl", "tiny")).state_dict()
    w1 = ckpt_tensors(s1 / "checkpoints" / "step_00000002")
    llm = [k for k in w1 if QWEN2.group_of(k[len("model."):]) == "llm"]
    vis = [k for k in w1 if QWEN2.group_of(k[len("model."):]) == "vision"]
    assert llm and all(torch.equal(w1[k], init[k[len("model."):]]) for k in llm)
    assert not all(torch.equal(w1[k], init[k[len("model."):]]) for k in vis)  # the ViT trained
    # Stage 3 froze the ViT: its weights equal stage 2's final ones bitwise, though stage 2 saved them
    # sharded over dp2 x tp2 and stage 3 loaded them into tp2 (the hand-off resharded them).
    w2, w3 = ckpt_tensors(s2 / "checkpoints" / "step_00000002"), ckpt_tensors(s3 / "checkpoints" / "step_00000004")
    vis = [k for k in w2 if QWEN2.group_of(k[len("model."):]) == "vision"]
    assert vis and all(torch.equal(w2[k], w3[k]) for k in vis)
    assert not torch.equal(w2["model.lm_head.weight"], w3["model.lm_head.weight"])  # the LLM trained
    # A fresh optimizer per stage: AdamW's step count in stage 3's final checkpoint is its 4 updates, not 4 +
    # stage 2's steps.
    steps = ckpt_tensors(s3 / "checkpoints" / "step_00000004", "optim.state.")
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {4.0}
    assert not any(QWEN2.group_of(k[len("optim.state."):]) == "vision" for k in steps)  # frozen: no optimizer state


def resume_from(src: Path, step: int, dst: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


@pytest.mark.timeout(900)
def test_resume_with_changed_layout_same_dp_is_exact_in_data(chain, tmp_path):
    """Saved with tp2 at step 2, resumed with pp2 (dp stays 1): the loader position is restored, weights and
    optimizer state reshard; steps 3-4 match the uninterrupted tp2 run within float tolerance."""
    s3 = chain.stage(3)
    run_dir = tmp_path / "pp2"
    resume_from(s3, 2, run_dir)
    torchrun(2, "stage3.yaml", [f"run_dir={run_dir}", *SHORT, "parallel.pp=2", f"model.init_from={chain.stage(2)}"],
             chain.env)
    start = events(run_dir, "start")[0]
    assert start["step"] == 2 and start["layout"] == "dp1 x tp1 x pp2 (2 ranks)" and start["data_pass"] == 0
    ref, got = step_records(s3), step_records(run_dir)
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert got[s]["tokens"] == ref[s]["tokens"]  # the same microbatches
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), s
    # The optimizer state was restored and resharded: AdamW's step count continues (2 saved + 2 new updates).
    steps = ckpt_tensors(run_dir / "checkpoints" / "step_00000004", "optim.state.")
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {4.0}


@pytest.mark.timeout(900)
def test_resume_with_changed_dp_starts_a_new_data_pass(chain, tmp_path):
    """Saved with dp2 x tp2 (stage 2's final step 2), resumed with tp2 (dp 2 -> 1) and extended to 3 steps:
    loads, continues, and says the data is a new pass."""
    s2 = chain.stage(2)
    run_dir = tmp_path / "tp2"
    resume_from(s2, 2, run_dir)
    torchrun(2, "stage2.yaml", [f"run_dir={run_dir}", *SHORT, "train.steps=3", "parallel.tp=2",
                                f"model.init_from={chain.stage(1)}"], chain.env)
    start = events(run_dir, "start")[0]
    assert start["step"] == 2 and start["data_pass"] == 1 and start["layout"] == "dp1 x tp2 x pp1 (2 ranks)"
    got = step_records(run_dir)
    assert sorted(got) == [3]
    # The weights and optimizer state were restored (not re-initialized) and the new pass is a pure function of
    # (seed, pass): one process resumed from the same checkpoint (dp 1 as well) takes the same step 3.
    one = tmp_path / "one"
    resume_from(s2, 2, one)
    run_cmd([sys.executable, "-m", "train", str(RECIPES / "stage2.yaml"), f"run_dir={one}", *SHORT, "train.steps=3",
             f"model.init_from={chain.stage(1)}"], chain.env, 300)
    ref = step_records(one)
    assert events(one, "start")[0]["data_pass"] == 1 and ref[3]["tokens"] == got[3]["tokens"]
    assert got[3]["loss"] == pytest.approx(ref[3]["loss"], rel=1e-5)
    assert got[3]["grad_norm"] == pytest.approx(ref[3]["grad_norm"], rel=1e-3)
    steps = ckpt_tensors(run_dir / "checkpoints" / "step_00000003", "optim.state.")
    assert {float(v) for k, v in steps.items() if k.endswith(".step")} == {3.0}  # 2 saved + 1 new


@pytest.fixture(scope="session")
def hf_export(chain, tmp_path_factory) -> Path:
    """`python -m tools.export` of stage 3's final checkpoint (saved with tp2), fp32, in several shards."""
    out = tmp_path_factory.mktemp("export") / "hf"
    run_cmd([sys.executable, "-m", "tools.export", str(chain.stage(3)), str(out), "--dtype", "fp32",
             "--max-shard-gb", "0.03"], chain.env, 300)
    return out


@pytest.mark.timeout(600)
def test_hf_export_round_trip_and_parity(chain, hf_export):
    ck = chain.stage(3) / "checkpoints" / "step_00000004"
    out = hf_export
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    from model.hf_adapter import load_hf_checkpoint

    cfg, sd = load_hf_checkpoint(out)
    assert not config_diff(cfg, get_preset("qwen2_vl", "tiny"))
    ours = ckpt_tensors(ck)
    assert {f"model.{k}" for k in sd} == set(ours) and all(torch.equal(sd[k], ours[f"model.{k}"]) for k in sd)
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert hf.config.text_config.num_hidden_layers == 4
    res = run_cmd([sys.executable, "-m", "model.parity", "--hf", str(out)], chain.env, 300)
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=") and float(last.split("=")[1]) <= 1e-4


@pytest.mark.timeout(900)
def test_deepspeed_launcher_and_kill9_restart_resume(demo_dir, hf_export, tmp_path):
    """Stage 3 (ChatML: only assistant turns supervised, so the LM head is cheap) from the exported HF directory,
    dp2: the reference run under the DeepSpeed launcher, then the same job under launch/torchrun.sh with
    MAX_RESTARTS=1, where rank 1 is killed with SIGKILL after step 3."""
    env = env_for(demo_dir)
    common = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=0", "optim.warmup_steps=1",
              f"model.init_from={hf_export}", "data.num_workers=1", "data.max_tokens=160"]
    # Reference: uninterrupted, started by the DeepSpeed launcher (it passes --local_rank=N).
    ref_dir = tmp_path / "ref"
    port = str(29500 + os.getpid() % 2000)
    run_cmd(["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "train",
             str(RECIPES / "stage3.yaml"), f"run_dir={ref_dir}", *common], env, 400)
    assert events(ref_dir, "start")[0]["layout"] == "dp2 x tp1 x pp1 (2 ranks)"
    ref = losses(ref_dir)
    assert len(ref) == 6
    # init_from an HF directory: each dp rank read only its FSDP shard of every tensor (the ViT's q/k/v rows
    # sliced out of the fused qkv); the frozen ViT still equals the HF weights, read by the model's own reader.
    from model.hf_adapter import load_hf_checkpoint

    _, hf_sd = load_hf_checkpoint(hf_export)
    w = ckpt_tensors(ref_dir / "checkpoints" / "step_00000006")
    vis = [k for k in hf_sd if QWEN2.group_of(k) == "vision"]
    assert vis and all(torch.equal(w[f"model.{k}"], hf_sd[k]) for k in vis)
    assert not torch.equal(w["model.lm_head.weight"], hf_sd["lm_head.weight"])  # the LLM trained
    # The same job under torchrun --max-restarts 1; rank 1 is killed with SIGKILL once step 3 is logged.
    run_dir = tmp_path / "killed"
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), str(RECIPES / "stage3.yaml"), f"run_dir={run_dir}", *common]
    log = tmp_path / "torchrun.log"
    script_env = {**env, "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable}
    proc = subprocess.Popen(cmd, env=script_env, cwd=REPO, stdout=open(log, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            m = run_dir / "metrics.jsonl"
            if m.is_file() and any(r.get("step", 0) >= 3 and "loss" in r
                                   for r in map(json.loads, m.read_text().splitlines())):
                pid = trainer_pid(str(run_dir), RANK="1")
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
            time.sleep(0.05)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run finished before rank 1 could be killed"
    assert proc.returncode == 0, log.read_text()[-20000:]
    starts = events(run_dir, "start")
    assert [s["restart"] for s in starts] == [0, 1] and starts[1]["resumed_from"] is not None
    assert starts[1]["step"] in (2, 4)  # the latest complete checkpoint when rank 1 died
    got = step_records(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s]["loss"] for s in range(1, 7)] == ref  # bitwise: same math, exact resume
    a = ckpt_tensors(ref_dir / "checkpoints" / "step_00000006", "")
    b = ckpt_tensors(run_dir / "checkpoints" / "step_00000006", "")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and optimizer state


@pytest.mark.timeout(600)
def test_tied_embeddings_resume_from_one_process_into_pp2(demo_dir, tmp_path):
    """Tied embeddings (as Qwen2-VL-2B): one process has a single embed_tokens.weight parameter, a pipeline's
    last stage a kept-equal copy that is its head. Saved by one process, resumed with pp2: both copies take the
    embedding's weights and optimizer state (the same keys) and stay bitwise equal (checked every step)."""
    env = env_for(demo_dir)
    run_dir = tmp_path / "tied"
    common = [f"run_dir={run_dir}", *SHORT, "model.init_from=null", "model.overrides={text.tie_word_embeddings: true}"]
    run_cmd([sys.executable, "-m", "train", str(RECIPES / "stage3.yaml"), *common, "train.steps=2"], env, 300)
    torchrun(2, "stage3.yaml", [*common, "train.steps=3", "parallel.pp=2", "parallel.check_replicated_every=1"], env)
    assert sorted(step_records(run_dir)) == [1, 2, 3] and events(run_dir, "start")[1]["step"] == 2
    st = ckpt_tensors(run_dir / "checkpoints" / "step_00000003", "optim.state.")
    assert float(st["optim.state.embed_tokens.weight.step"]) == 3.0
    assert not any(k.startswith("optim.state.lm_head.") for k in st)  # one logical weight, one state
    w = ckpt_tensors(run_dir / "checkpoints" / "step_00000003")
    assert torch.equal(w["model.lm_head.weight"], w["model.embed_tokens.weight"])
