"""The loop on one process with the real loader and the real engine: exact resume (bitwise, loader workers > 0),
non-finite steps skipped and counted, metrics.jsonl fields, W&B offline files."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from train_helpers import RECIPES, demo_config, losses, step_records

from train.checkpoint import checkpoint_keys
from train.config import load_config
from train.trainer import Trainer, TrainingStopped, run


def cfg_for(demo_dir: Path, run_dir: Path, *extra: str, stage: int = 3):
    return demo_config(
        demo_dir, RECIPES / f"stage{stage}.yaml",
        [f"run_dir={run_dir}", "model.init_from=null", "checkpoint.keep_last=0", "optim.warmup_steps=1",
         "data.max_tokens=160", *extra],
    )


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model + optimizer), read back in one process."""
    md = FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if hasattr(v, "size") and k.startswith(("model.", "optim."))}
    import torch.distributed.checkpoint as dcp

    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


@pytest.mark.timeout(300)
def test_exact_resume_bitwise_with_loader_workers(demo_dir, tmp_path):
    """4 steps uninterrupted == 2 steps, then a new Trainer resuming from the step-2 checkpoint for 2 more:
    identical losses (==, fp32 CPU) and identical parameters and optimizer state, with 2 loader workers."""
    a = tmp_path / "a"
    common = ["train.steps=4", "checkpoint.every=2", "data.num_workers=2"]
    run(cfg_for(demo_dir, a, *common))
    ref = losses(a)
    assert len(ref) == 4
    # The interrupted run: everything it left is the step-2 checkpoint (what a crash after step 2 leaves).
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_00000002", b / "checkpoints" / "step_00000002")
    res = run(cfg_for(demo_dir, b, *common))
    assert res.final_step == 4 and step_records(b)[3].get("resumed_from") == 2
    got = [step_records(b)[s]["loss"] for s in (3, 4)]
    assert got == ref[2:], (got, ref)
    ta, tb = read_ckpt(a / "checkpoints" / "step_00000004"), read_ckpt(b / "checkpoints" / "step_00000004")
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"differ after resume: {bad[:5]}"


@pytest.mark.timeout(300)
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(demo_dir, tmp_path):
    cfg = cfg_for(demo_dir, tmp_path / "nan", "train.steps=8", "checkpoint.every=0", "train.max_consecutive_skips=2",
                  "data.num_workers=0")
    trainer = Trainer(cfg)
    poison = {2, 4, 5}  # 1-based steps whose loss becomes NaN; 4 and 5 in a row hit the limit of 2
    # NaN from the final norm of the LLM on the chosen steps (a test-side fault, not a product switch).
    norm = trainer.engine.module.norm
    norm.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step + 1 in poison else out)
    calls = []
    real_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (calls.append(trainer.step + 1), real_step(*a, **k))[1]
    with pytest.raises(TrainingStopped, match=r"stopping at step 5: 3 steps skipped.*2 in a row"):
        try:
            trainer.train()
        finally:
            trainer.close()
    assert calls == [1, 3], calls  # no update on the poisoned steps
    recs = step_records(tmp_path / "nan")
    assert [recs[s]["skipped_steps"] for s in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 3]
    events = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stop" and events[-1]["reason"] == "diverged"


@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_and_stops_then_resumes(demo_dir, tmp_path):
    """A SIGTERM (SLURM preemption, scancel, torchrun shutting down) during step 2: the rank finishes the step,
    saves step 2 and stops; running the same config again resumes there and completes."""
    run_dir = tmp_path / "term"
    cfg = cfg_for(demo_dir, run_dir, "train.steps=4", "checkpoint.every=0", "data.num_workers=0")
    trainer = Trainer(cfg)
    trainer.engine.module.norm.register_forward_hook(
        lambda m, i, out: os.kill(os.getpid(), signal.SIGTERM) if trainer.step == 1 else None
    )
    try:
        res = trainer.train()
    finally:
        trainer.close()
    assert res.stop_reason == "signal" and res.final_step == 2 and res.checkpoint.name == "step_00000002"
    res2 = run(cfg_for(demo_dir, run_dir, "train.steps=4", "checkpoint.every=0", "data.num_workers=0"))
    assert res2.final_step == 4 and res2.stop_reason == "completed" and sorted(step_records(run_dir)) == [1, 2, 3, 4]


@pytest.mark.timeout(300)
def test_metrics_fields_and_wandb_offline(demo_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "m"
    cfg = cfg_for(demo_dir, run_dir, "train.steps=3", "checkpoint.every=0", "metrics.wandb.mode=auto",
                  "data.num_workers=1")
    res = run(cfg)
    recs = step_records(run_dir)
    assert sorted(recs) == [1, 2, 3]
    for r in recs.values():
        for k in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "flops_per_s", "data_wait_s", "peak_mem_gb",
                  "skipped_steps", "skipped_samples", "packing_efficiency", "lr_groups"):
            assert k in r, k
        assert r["mfu"] is None  # CPU: no peak, achieved FLOP/s instead
        assert r["tokens"] > 0 and r["flops_per_s"] > 0 and 0 < r["packing_efficiency"] <= 1
        assert set(r["lr_groups"]) == {"merger", "llm"}  # stage 3: the ViT is frozen
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-3)
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()
    ck = res.checkpoint
    assert (ck / "config.yaml").is_file() and "model.visual.merger.mlp.0.weight" in checkpoint_keys(ck)
    # W&B: no key -> an offline run under RUN_DIR/wandb whose records hold our config and every step's values
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    (wfile,) = runs[0].glob("run-*.wandb")
    history, config = wandb_records(wfile)
    assert [h["loss"] for h in history] == pytest.approx([recs[s]["loss"] for s in (1, 2, 3)])
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert config["model"]["preset"] == "tiny" and config["train"]["stage"] == 3


def wandb_records(path: Path) -> tuple[list[dict], dict]:
    """History rows and the run config from a .wandb file (LevelDB-log framing of protobuf Records; wandb >= 0.2x
    has no Python reader for it anymore)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, raw = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raw.append(buf + chunk)
    history, config = [], {}
    for r in raw:
        rec = pb.Record()
        rec.ParseFromString(r)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
    return history, config


@pytest.mark.timeout(300)
def test_finite_epochs_stop_cleanly_when_the_data_runs_out(demo_dir, tmp_path):
    """data.epochs=1 and more steps than the data holds: every rank stops at the same step, saves, says why."""
    run_dir = tmp_path / "epochs"
    res = run(cfg_for(demo_dir, run_dir, "train.steps=100", "checkpoint.every=0", "data.epochs=1",
                      "data.num_workers=0", "train.global_microbatches=4"))
    assert res.stop_reason == "data_exhausted" and 5 <= res.final_step < 100
    assert res.checkpoint.name == f"step_{res.final_step:08d}"
    end = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["reason"] == "data_exhausted"
    # one pass: no sample trained twice (the microbatches of the incomplete last step are dropped)
    n_samples = json.loads((demo_dir / "data" / "stage3" / "dataset.json").read_text())["samples"]
    assert sum(r["samples"] for r in step_records(run_dir).values()) <= n_samples
