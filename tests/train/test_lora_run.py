"""LoRA in a run (train/lora.py and its call sites): the trainable counts and the dry run's per-rank accounting of
the adapters under tensor parallelism (its optimizer bytes are checked against a real layout in
tests/parallel/test_layouts.py); runs of `python -m train` with a lora section: only adapters (and the merger)
train, exact resume, tp2 equal to one process, init_from every kind of source, the export tool's --lora merged /
adapter and its refusals; the dry run's memory lines and the section's parse-time checks."""

from __future__ import annotations

import pytest
import torch

from model.hf_adapter import read_hf_tensors
from model.lora import LoRAConfig, adapter_state_dict, apply_lora, lora_modules
from model.lora_peft import load_peft_adapter
from model.vlm import VLModel
from tests.model.conftest import small_vocab_cfg
from tests.model.test_lora import randomize_b
from train.dry_run import local_numel, rank_numel, tp_roles
from train.lora import trainable_by_group

LCFG = LoRAConfig(rank=4, alpha=8, vision=["attn"], fully_trainable=["merger"])


def _trained(family: str = "qwen2_vl") -> VLModel:
    torch.manual_seed(0)
    model = VLModel(small_vocab_cfg(family=family))
    apply_lora(model, LCFG)
    randomize_b(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("visual.merger."):
                p.add_(0.05)
    return model


def test_trainable_counts_and_tp_accounting():
    model = _trained()
    adapters = sum(p.numel() for p in adapter_state_dict(model).values())
    merger = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual.merger."))
    counts = trainable_by_group(model.named_parameters(), "qwen2_vl")
    assert counts["vision"] == sum(p.numel() for k, p in adapter_state_dict(model).items() if k.startswith("visual."))
    assert sum(counts.values()) == adapters + merger
    q, o = lora_modules(model)["layers.0.self_attn.q_proj"], lora_modules(model)["layers.0.self_attn.o_proj"]
    cases = {"layers.0.self_attn.q_proj.lora_A.weight": q.lora_A.weight.numel(),       # colwise: A whole
             "layers.0.self_attn.q_proj.lora_B.weight": q.lora_B.weight.numel() // 2,  # B split like the output
             "layers.0.self_attn.o_proj.lora_A.weight": o.lora_A.weight.numel() // 2,  # rowwise: A split like input
             "layers.0.self_attn.o_proj.lora_B.weight": o.lora_B.weight.numel(),       # B whole
             "layers.0.self_attn.q_proj.weight": q.weight.numel() // 2,
             "layers.0.self_attn.o_proj.bias": 64 if o.bias is not None else 0}
    params, roles = dict(model.named_parameters()), tp_roles(model)
    for name, want in cases.items():
        if name in params:
            assert local_numel(name, params[name].numel(), 2, roles) == want, name
    k = rank_numel(model, tp=1)
    assert k.trainable == adapters + merger and k.params == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ runs
def _lora_cfg(demo_dir, run_dir, *extra, lora: bool = True):
    from test_loop import cfg_for

    lo = ["lora.rank=4", "lora.alpha=8", "lora.fully_trainable=[merger]"] if lora else []
    return cfg_for(demo_dir, run_dir, "train.steps=4", "checkpoint.every=2", "data.num_workers=0", *lo, *extra)


def _model_tensors(ck) -> dict[str, torch.Tensor]:
    from test_loop import read_ckpt

    return {k[len("model."):]: v for k, v in read_ckpt(ck).items() if k.startswith("model.")}


def _engine_tensors(trainer) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in trainer.engine.named_parameters()}


@pytest.mark.timeout(600)
def test_lora_run_resumes_bitwise_trains_only_adapters_and_exports(demo_dir, tmp_path):
    """Stage 3 with adapters on the LLM and the merger trained in full: the metrics line counts the trainable
    parameters, only adapters and the merger change and get AdamW state, a resume from step 2 equals the
    uninterrupted run bitwise, and the export tool writes the merged HF directory and the peft adapter (and
    refuses a LoRA checkpoint without --lora)."""
    from train_helpers import losses, step_records

    from tools.export import export
    from train.trainer import run

    a = tmp_path / "a"
    run(_lora_cfg(demo_dir, a))
    recs = step_records(a)
    ck2, ck4 = a / "checkpoints" / "step_00000002", a / "checkpoints" / "step_00000004"
    t2, t4 = _model_tensors(ck2), _model_tensors(ck4)
    n_adapters = sum(v.numel() for k, v in t4.items() if ".lora_" in k)
    n_merger = sum(v.numel() for k, v in t4.items() if k.startswith("visual.merger."))
    assert recs[1]["trainable_params"] == n_adapters + n_merger < sum(v.numel() for v in t4.values()) / 10
    changed = {k for k in t4 if not torch.equal(t2[k], t4[k])}
    assert changed and all(".lora_" in k or k.startswith("visual.merger.") for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed)
    from test_loop import read_ckpt

    opt = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in read_ckpt(ck4) if k.startswith("optim.state.")}
    assert opt and all(".lora_" in k or k.startswith("visual.merger.") for k in opt), sorted(opt)[:5]
    # Resume from step 2: bitwise the same losses and tensors.
    b = tmp_path / "b"
    import shutil

    shutil.copytree(ck2, b / "checkpoints" / "step_00000002")
    run(_lora_cfg(demo_dir, b))
    assert [step_records(b)[s]["loss"] for s in (3, 4)] == losses(a)[2:]
    ta, tb = read_ckpt(ck4), read_ckpt(b / "checkpoints" / "step_00000004")
    assert ta.keys() == tb.keys() and not [k for k in ta if not torch.equal(ta[k], tb[k])]
    # Export: merged (the adapters folded in, fp32) and peft's adapter format; no --lora is refused.
    export(ck4, tmp_path / "merged", dtype="fp32", lora="merged")
    merged = read_hf_tensors(tmp_path / "merged")
    from model.family import config_from_hf_dict
    from model.hf_adapter import to_hf_state_dict
    from model.lora import merged_state_dict_from
    from train.checkpoint import read_meta

    mcfg = config_from_hf_dict(read_meta(ck4)["model_config"])
    want = to_hf_state_dict(merged_state_dict_from(t4, LoRAConfig(rank=4, alpha=8).scaling), False)
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    export(ck4, tmp_path / "adapter", dtype="fp32", lora="adapter")
    shape = VLModel(mcfg)
    apply_lora(shape, LoRAConfig(rank=4, alpha=8, fully_trainable=["merger"]), seed=9)
    load_peft_adapter(shape, tmp_path / "adapter")
    got = shape.state_dict()
    assert all(torch.equal(got[k], v) for k, v in t4.items() if ".lora_" in k or k.startswith("visual.merger."))
    with pytest.raises(ValueError, match=r"is a LoRA run's: pass --lora merged .* or --lora adapter"):
        export(ck4, tmp_path / "plain")


@pytest.mark.timeout(600)
def test_lora_init_from_checkpoints_hf_and_peft(demo_dir, tmp_path):
    """init_from: a run without LoRA (base weights, fresh adapters with B = 0), a LoRA run (its adapters
    continue), an HF directory (fresh adapters), a peft adapter directory (over the HF base it names); a LoRA
    checkpoint into a recipe without lora is refused, naming the merged export."""
    from tools.export import export
    from train.trainer import Trainer, run

    full = tmp_path / "full"
    run(_lora_cfg(demo_dir, full, "train.steps=2", lora=False))
    base = _model_tensors(full / "checkpoints" / "step_00000002")
    from core.cli import run_cli
    from tools.export import main as export_main

    with pytest.raises(ValueError, match=r"--lora adapter: checkpoint .* has no LoRA adapters") as e:
        export(full, tmp_path / "x", lora="adapter")
    assert "\n" not in str(e.value)
    assert run_cli("python -m tools.export", export_main, [str(full), str(tmp_path / "x"), "--lora", "adapter"]) == 2
    t = Trainer(_lora_cfg(demo_dir, tmp_path / "c", f"model.init_from={full}"))
    got = _engine_tensors(t)
    assert all(torch.equal(got[k], v) for k, v in base.items())
    assert all(got[k].abs().max() == 0 for k in got if ".lora_B." in k)
    a_lora = [k for k in got if ".lora_A." in k]
    assert a_lora and all(got[k].abs().max() > 0 for k in a_lora)
    # A LoRA run from the HF export of `full`, exported as a peft adapter naming that directory as its base.
    export(full / "checkpoints" / "step_00000002", tmp_path / "full_hf", dtype="fp32")
    e = tmp_path / "e"
    run(_lora_cfg(demo_dir, e, "train.steps=2", f"model.init_from={tmp_path / 'full_hf'}"))
    e_t = _model_tensors(e / "checkpoints" / "step_00000002")
    assert all(torch.equal(e_t[k], v) for k, v in base.items() if not k.startswith("visual.merger."))
    for src in (e, None):  # the LoRA run's checkpoint, then its peft adapter over the HF base
        if src is None:
            export(e / "checkpoints" / "step_00000002", tmp_path / "e_adapter", dtype="fp32", lora="adapter")
            src = tmp_path / "e_adapter"
        t = Trainer(_lora_cfg(demo_dir, tmp_path / f"from_{src.name}", f"model.init_from={src}"))
        got = _engine_tensors(t)
        assert got.keys() == e_t.keys() and all(torch.equal(got[k], v) for k, v in e_t.items()), src
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=r"is a LoRA run's .* export it merged .*--lora merged"):
        Trainer(_lora_cfg(demo_dir, tmp_path / "no_lora", f"model.init_from={e}", lora=False))


def test_dry_run_shows_lora_savings_and_config_checks():
    """The 7B stage-3 layout (tp4 x dp8) with adapters: gradients + optimizer state per rank from the dry run's
    memory model, full training -> LoRA, where the full-training figure is the plain recipe's own; and the
    lora section's cross-checks are one-line ConfigErrors at parse time."""
    from train_helpers import REPO

    from train.config import load_config
    from train.dry_run import dry_run

    recipe = REPO / "recipes" / "qwen2vl_7b" / "stage3.yaml"
    full = dry_run(load_config(recipe), world_size=32)
    lora = dry_run(load_config(recipe, ["lora.rank=64", "lora.alpha=128", "lora.fully_trainable=[merger]"]),
                   world_size=32)
    (f,), (lo,) = [s.memory for s in full.stages], [s.memory for s in lora.stages]
    assert lo["grads_optim_full_training"] == pytest.approx(f["grads"] + f["optimizer"])
    assert lo["grads"] + lo["optimizer"] < 0.1 * (f["grads"] + f["optimizer"])
    assert lo["params"] >= f["params"]  # the base weights stay (frozen), the adapters add a little
    assert "LoRA: rank 64, alpha 128" in lora.text and "saved)" in lora.text and "(LoRA adapters)" in lora.text
    print(lora.text)
    from core.config import ConfigError

    for overrides, match in ((["train.stage=3", "lora.vision=[attn]"], r"lora\.vision=\['attn'\] puts adapters on "
                                                                       r"the vision group, which this stage freezes"),
                             (["lora.rank=0"], r"lora\.rank=0: must be a positive integer"),
                             (["lora.rnak=4"], r"unknown config key 'lora\.rnak' \(did you mean 'rank'\?\)")):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(recipe, overrides)
        assert "\n" not in str(e.value)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_lora_tp2_run_equals_one_process_and_resumes_in_one_process(demo_dir, tmp_path):
    """`python -m train` under torchrun with tp2 + SP and adapters: the same losses as the one-process LoRA run
    (float tolerance: tp changes summation orders); its step-2 checkpoint (adapters sharded over tp) resumes in one
    process and continues like it."""
    import shutil

    from train_helpers import SHORT, env_for, losses, step_records, torchrun

    from train.trainer import run

    lo = ["lora.rank=4", "lora.alpha=8", "lora.fully_trainable=[merger]", "model.init_from=null",
          "data.num_workers=0"]
    tp = tmp_path / "tp2"
    torchrun(2, "stage3.yaml", [f"run_dir={tp}", *SHORT, "parallel.tp=2", *lo], env_for(demo_dir))
    one = tmp_path / "one"
    run(_lora_cfg(demo_dir, one))
    assert losses(tp) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == 4
    r = tmp_path / "resumed"
    shutil.copytree(tp / "checkpoints" / "step_00000002", r / "checkpoints" / "step_00000002")
    run(_lora_cfg(demo_dir, r))
    got = step_records(r)
    assert sorted(got) == [3, 4] and got[3].get("resumed_from") == 2
    assert [got[s]["loss"] for s in (3, 4)] == pytest.approx(losses(one)[2:], rel=1e-5)
