"""Launcher environment handling (deepspeed --local_rank, SLURM, MPI) and the dry run (72B on 128 GPUs on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from model.family import get_preset
from model.meta import meta_model
from parallel.launcher import export_launch_env, first_host, resolve_launch_env, strip_local_rank
from tests.model.test_model import PUBLISHED
from train.config import load_config
from train.dry_run import dry_run, local_numel, tp_roles

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ launchers
def test_deepspeed_local_rank_argument_is_stripped_and_checked():
    assert strip_local_rank(["r.yaml", "--local_rank=3", "a=1"]) == (["r.yaml", "a=1"], 3)
    assert strip_local_rank(["--local-rank", "2", "r.yaml"]) == (["r.yaml"], 2)
    # What `deepspeed --num_gpus 2 --module train ...` gives rank 1 (observed from deepspeed 0.19 on CPU).
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611",
           "CROSS_RANK": "0", "LOCAL_SIZE": "2"}
    launch = resolve_launch_env(env, ["--local_rank=1", "recipes/tiny/stage1.yaml", "train.steps=2"])
    assert (launch.launcher, launch.rank, launch.local_rank) == ("deepspeed", 1, 1)
    with pytest.raises(ValueError, match="--local_rank=0 disagrees with LOCAL_RANK=1"):
        resolve_launch_env(env, ["--local_rank=0", "r.yaml"])


def test_slurm_without_torchrun():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-004,017]"}
    launch = resolve_launch_env(env, ["r.yaml"])
    assert launch.launcher == "slurm"
    export_launch_env(launch, env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert first_host("node17") == "node17" and first_host("a[1-2],b3") == "a1"


def test_mpi_and_single_process():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        resolve_launch_env(env, [])
    env["MASTER_ADDR"] = "h0"
    launch = resolve_launch_env(env, [])
    export_launch_env(launch, env)
    assert launch.launcher == "openmpi" and env["RANK"] == "3" and env["MASTER_PORT"] == "29500"
    single: dict[str, str] = {}
    launch = resolve_launch_env(single, ["r.yaml"])
    export_launch_env(launch, single)
    assert launch.launcher == "none" and "RANK" not in single
    with pytest.raises(ValueError, match="RANK=5 is outside WORLD_SIZE=2"):
        resolve_launch_env({"RANK": "5", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, [])


def test_gpu_layouts_with_sequence_parallel_bucket_their_lengths():
    """docs/parallel.md: with TP + SP on GPUs, set sp_pad_multiple (unbounded packed lengths make every TP op
    re-propagate shardings); every shipped recipe that shards over tp does."""
    checked = []
    for recipe in sorted((REPO / "recipes").glob("qwen2vl_*/stage*.yaml")):
        cfg = load_config(recipe, ["data.tokenizer=/t", "data.datasets=[{path: /d}]"])
        p = cfg.parallel
        if p.tp > 1 and p.sequence_parallel:
            assert p.sp_pad_multiple >= 64 and p.sp_pad_multiple % p.tp == 0, (recipe, p.sp_pad_multiple)
            checked.append(recipe.parent.name)
    assert {"qwen2vl_7b", "qwen2vl_72b"} <= set(checked)


def test_launch_scripts_are_valid_shell():
    for script in ("torchrun.sh", "deepspeed.sh", "slurm.sbatch", "gpus.sh"):
        res = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)


# ------------------------------------------------------------------------------------------ dry run
def test_dry_run_72b_on_128_gpus():
    cfg = load_config(REPO / "recipes" / "qwen2vl_72b" / "stage2.yaml")
    r = dry_run(cfg)
    assert (r.world_size, r.pp, r.dp, r.tp) == (128, 4, 4, 8)
    assert 72e9 < r.params_total < 75e9
    # every decoder layer on exactly one stage, in order; stage 0 holds the ViT
    assert [i for s in r.stages for i in s.layers] == list(range(80))
    assert "visual (32 blocks)" in r.stages[0].modules and "lm_head" in r.stages[-1].modules
    # the per-rank parameters add up to the model: sum over stages x tp ~= total (replicated parts counted tp x)
    assert sum(s.params for s in r.stages) * 8 >= r.params_total
    assert r.max_memory_gb < 80, r.text
    # per-rank memory shrinks with dp for the sharded optimizer state
    assert all(s.memory["optimizer"] == pytest.approx(8 * s.trainable / 4 / 1e9) for s in r.stages)
    assert "pipeline split" in r.text and "memory per rank" in r.text


def test_dry_run_stage1_freezes_llm_and_errors_on_bad_layouts():
    cfg = load_config(REPO / "recipes" / "qwen2vl_72b" / "stage1.yaml")
    r = dry_run(cfg)
    assert r.trainable_by_group["llm"] == 0 and r.trainable_by_group["vision"] > 6e8
    assert all(s.trainable == 0 for s in r.stages[1:])  # stages of frozen LLM layers only
    with pytest.raises(ValueError, match="divisible by 3"):  # 7B has 28 heads / 4 kv heads
        dry_run(load_config(REPO / "recipes" / "qwen2vl_7b" / "stage2.yaml", ["parallel.tp=3"]), world_size=24)
    with pytest.raises(ValueError, match="world size"):
        dry_run(load_config(REPO / "recipes" / "qwen2vl_72b" / "stage2.yaml"), world_size=100)
    with pytest.raises(ValueError, match="--world-size"):
        dry_run(load_config(REPO / "recipes" / "qwen2vl_2b" / "stage2.yaml"))


def test_dry_run_shows_the_memory_of_the_longest_sample_the_recipe_allows():
    """Long videos train (a video sample up to data.max_video_sample_tokens travels alone in its microbatch): the
    dry run's memory holds that microbatch too, and the shipped 72B layout still fits an 80 GB GPU with it."""
    cfg = load_config(REPO / "recipes" / "qwen2vl_72b" / "stage2.yaml")
    assert cfg.data.video_sample_tokens > cfg.data.max_tokens  # the recipe lets long videos through
    r = dry_run(cfg)
    for s in r.stages:
        assert s.memory["activations_longest"] > s.memory["activations"], s.memory
        assert s.memory["total_longest"] == pytest.approx(s.memory["total"] - s.memory["activations"]
                                                          + s.memory["activations_longest"])
    assert max(s.memory["total_longest"] for s in r.stages) < 80, r.text
    assert f"longest one allowed (a video sample alone) {cfg.data.video_sample_tokens} tokens" in r.text
    # Without a video budget of their own the longest microbatch is a typical one.
    plain = dry_run(load_config(REPO / "recipes" / "qwen2vl_72b" / "stage2.yaml",
                                ["data.max_video_sample_tokens=null", "data.max_video_sample_patches=null",
                                 "data.video.max_tokens=0"]))
    assert all(s.memory["activations_longest"] == pytest.approx(s.memory["activations"]) for s in plain.stages)


@pytest.mark.parametrize("family,row_bias", [("qwen2_vl", "mlp.fc2.bias"), ("qwen2_5_vl", "mlp.down_proj.bias"),
                                             ("qwen3_vl", "mlp.linear_fc2.bias")])
def test_tp_shard_accounting_matches_the_engine_plans(family, row_bias):
    """Column/row-parallel projections and vocab-parallel embedding/head are split; norms, the patch
    embedding, the mergers and row-parallel biases are replicated: the family's declared roles, which
    parallel/tensor_parallel.py applies."""
    roles = tp_roles(meta_model(get_preset(family, "tiny")))
    assert local_numel("layers.0.self_attn.q_proj.weight", 800, 4, roles) == 200
    assert local_numel("layers.0.self_attn.o_proj.weight", 800, 4, roles) == 200
    assert local_numel(f"visual.blocks.1.{row_bias}", 64, 4, roles) == 64
    assert local_numel(f"visual.blocks.1.{row_bias.replace('bias', 'weight')}", 64, 4, roles) == 16
    assert local_numel("visual.blocks.1.attn.q_proj.bias", 32, 4, roles) == 8
    assert local_numel("layers.2.input_layernorm.weight", 64, 4, roles) == 64
    assert local_numel("embed_tokens.weight", 151936, 2, roles) == 151936 // 2
    assert roles and not any("merger" in k for k in roles)  # the mergers are never sharded
    if family == "qwen2_vl":
        assert local_numel("layers.0.self_attn.q_proj.bias", 80, 4, roles) == 20
    if family == "qwen3_vl":  # QK-norm weights stay whole (their gradients are summed over tp)
        assert local_numel("layers.0.self_attn.q_norm.weight", 24, 4, roles) == 24


def test_dry_run_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "train", str(REPO / "recipes" / "qwen2vl_2b" / "stage2.yaml"),
                          "--dry-run", "--world-size", "8"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "pp1 x dp8 x tp1 = 8 ranks" in res.stdout and "memory per rank" in res.stdout


@pytest.mark.parametrize("family_preset", sorted(PUBLISHED))
def test_dry_run_of_every_preset_counts_its_parameters_like_transformers(family_preset):
    """`python -m train --dry-run` of each family's presets: the parameter count it prints is the model's (which
    tests/model/test_model.py holds equal to transformers' and the model card's), and it prints a memory table."""
    family, name = family_preset
    cfg = load_config(REPO / "recipes" / "qwen2vl_7b" / "stage2.yaml",
                      [f"model.family={family}", f"model.preset={name}", "model.init_from=null", "parallel.tp=1",
                       "parallel.pp=1"])
    r = dry_run(cfg, world_size=8)
    n = sum(p.numel() for p in meta_model(get_preset(family, name)).parameters())
    assert r.params_total == n and abs(n / 1e9 - PUBLISHED[family_preset]) < 0.06
    assert f"parameters: total {n / 1e9:.2f}B" in r.text and "memory per rank" in r.text
