"""Freezing by group, AdamW groups (per-group LR, no decay on norms/biases), the LR schedule, and the loop's
numerics on one process: loss normalized by the global supervised count, frozen params get no grads/state."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from train_synth import make_batch

from model.family import FAMILY_NAMES, get_family, get_preset
from model.loss import model_loss
from model.vlm import VLModel
from train.config import load_config
from train.optim import (
    apply_freeze,
    build_optimizer,
    decays,
    lr_multiplier,
    optimizer_step,
    set_lr,
)

DATA = ["data.tokenizer=/tok", "data.datasets=[{path: /d}]"]


QWEN2 = get_family("qwen2_vl")


def tiny(family: str = "qwen2_vl") -> VLModel:
    torch.manual_seed(0)
    return VLModel(get_preset(family, "tiny"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_groups_by_fqn_prefix(family):
    """Every parameter is in exactly one of the family's groups. Qwen3-VL's position table is vision; its DeepStack
    mergers project ViT features into the LLM as the patch merger does, so they are merger (trained in stage 3 with
    the ViT frozen), as Qwen3-VL's own fine-tuning code (qwen-vl-finetune, tune_mm_mlp) groups them."""
    names = dict(tiny(family).named_parameters())
    fam = get_family(family)
    groups = {n: fam.group_of(n) for n in names}
    merger = next(n for n in names if n.startswith("visual.merger."))
    assert groups[merger] == "merger"
    assert groups["visual.blocks.0.attn.q_proj.weight"] == "vision"
    assert groups["visual.patch_embed.proj.weight"] == "vision"
    assert groups["embed_tokens.weight"] == "llm" and groups["lm_head.weight"] == "llm"
    assert groups["layers.3.mlp.up_proj.weight"] == "llm" and groups["norm.weight"] == "llm"
    assert {"vision", "merger", "llm"} == set(groups.values())
    if family == "qwen3_vl":
        assert groups["visual.pos_embed.weight"] == "vision"
        assert {groups[n] for n in names if "deepstack" in n} == {"merger"}


def test_no_weight_decay_on_norms_biases_and_vectors():
    for name, p in tiny().named_parameters():
        expect = p.ndim >= 2 and not name.endswith(".bias")
        assert decays(name, p) == expect, name
        if "norm" in name or "ln_q" in name:
            assert not decays(name, p), name


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("stage,frozen", [(1, {"llm"}), (2, set()), (3, {"vision"})])
def test_frozen_groups_have_no_grads_and_no_optimizer_state(stage, frozen, family):
    cfg = load_config(None, [*DATA, f"train.stage={stage}", "optim.lr=1e-3", "optim.lr_merger=5e-3"])
    model, fam = tiny(family), get_family(family)
    counts = apply_freeze(model.named_parameters(), cfg.frozen_groups, fam)
    # The trainable parameter count of each group (what the start record and the log report), counted here by the
    # groups' FQN prefixes (the merger: the patch merger and Qwen3-VL's DeepStack mergers): 0 for a frozen group,
    # every parameter of a trained one.
    sizes = {"merger": 0, "vision": 0, "llm": 0}
    for name, p in model.named_parameters():
        merger = name.startswith(("visual.merger.", "visual.deepstack_merger_list."))
        sizes["merger" if merger else "vision" if name.startswith("visual.") else "llm"] += p.numel()
    assert counts == {g: 0 if g in frozen else n for g, n in sizes.items()} and min(sizes.values()) > 0
    opt = build_optimizer(list(model.named_parameters()), cfg, fam)
    batch = make_batch(torch.Generator().manual_seed(1), family=family)
    loss_sum, n = model_loss(model, batch.labels, **batch.model_inputs())
    (loss_sum / n).backward()
    opt.step()
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    for name, p in model.named_parameters(remove_duplicate=False):
        if fam.group_of(name) in frozen:
            assert p.grad is None and not p.requires_grad, name
            assert not any(k.startswith(f"state.{name}.") for k in state), name
        elif name != "lm_head.weight" or not model.cfg.text.tie_word_embeddings:
            assert p.requires_grad and f"state.{name}.exp_avg" in state, name
    # per-group peak LRs and decay split
    by_name = {g["name"]: g for g in opt.param_groups}
    if "merger" not in frozen:
        assert by_name["merger"]["peak_lr"] == pytest.approx(5e-3)
        assert by_name["merger_no_decay"]["weight_decay"] == 0.0
    assert all(g["weight_decay"] == cfg.optim.weight_decay for n_, g in by_name.items() if not n_.endswith("no_decay"))


def test_unknown_frozen_group_is_an_error_naming_the_groups():
    with pytest.raises(ValueError, match=r"unknown groups \['text', 'vit'\]; groups are \['vision', 'merger', 'llm'\]"):
        apply_freeze(tiny().named_parameters(), ["vit", "llm", "text"], get_family("qwen2_vl"))


def test_resume_template_does_not_move_parameters():
    """The optimizer state a resume loads into is created by torch.distributed.checkpoint.state_dict (a zero-lr
    step of AdamW itself): it leaves every parameter and gradient as it was."""
    cfg = load_config(None, [*DATA, "train.stage=2", "optim.weight_decay=0.5"])
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(list(model.named_parameters()), cfg, QWEN2)
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert any(k.endswith(".exp_avg") for k in state)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_lr_schedule_warmup_cosine_min_ratio():
    cfg = load_config(None, [*DATA, "train.steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                             "optim.lr=1e-3", "optim.lr_vision=1e-4", "train.stage=2"])
    # warmup: linear from lr/10 (step 0) to lr (step 9)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1) and lr_multiplier(9, cfg) == pytest.approx(1.0)
    # cosine from 1 at step 10 to 0.1 at step 110, 0.55 halfway
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    lrs = set_lr(None, 60, cfg)
    assert lrs["vision"] == pytest.approx(1e-4 * 0.55) and lrs["llm"] == pytest.approx(1e-3 * 0.55)
    lin = load_config(None, [*DATA, "train.steps=10", "optim.schedule=linear", "optim.min_lr_ratio=0"])
    assert [round(lr_multiplier(s, lin), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_global_normalization_is_not_a_mean_of_means():
    """The engine divides every microbatch's loss SUM by the step's total supervised count: the gradient equals
    the one of the concatenated batch, which a mean of per-microbatch means would not give."""
    from parallel import ParallelConfig, init_distributed, parallelize

    model = tiny()
    ref = tiny()
    dims = init_distributed(ParallelConfig())
    engine = parallelize(model, dims, ParallelConfig(num_microbatches=2))
    g = torch.Generator().manual_seed(3)
    mbs = [make_batch(g, 48), make_batch(g, 96)]
    assert mbs[0].num_supervised != mbs[1].num_supervised
    res = engine.step(mbs)
    total = sum(mb.num_supervised for mb in mbs)
    assert res.num_supervised == total
    sums = [model_loss(ref, mb.labels, **mb.model_inputs())[0] for mb in mbs]
    expected = sum(sums) / total
    assert res.loss == pytest.approx(float(expected), rel=1e-6)
    expected.backward()
    name = "layers.0.mlp.down_proj.weight"
    got = dict(engine.named_parameters())[name].grad
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    torch.testing.assert_close(got, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_a_flagged_step_changes_nothing_and_an_unflagged_one_updates(impl):
    """optimizer_step's skip (train/trainer.py: a non-finite loss or gradient norm, decided on the device): with
    the fused kernel the flag goes in as found_inf, with foreach it is read first; either way a flagged step
    leaves parameters, moments and step counts as they were, and a later unflagged step equals a run that never
    saw the flagged one."""
    def run(flags: list[bool]) -> tuple[dict, dict]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, **({"fused": True} if impl == "fused" else
                                                               {"foreach": True}))
        for i, skip in enumerate(flags):
            torch.manual_seed(100 + i)
            lin(torch.randn(3, 8)).square().sum().backward()
            optimizer_step(opt, torch.tensor(skip))
            lin.zero_grad()
        return ({k: v.detach().clone() for k, v in lin.state_dict().items()},
                {id_: {k: v.clone() for k, v in st.items()} for id_, st in enumerate(opt.state.values())})

    p0, _ = run([])
    p_skip, s_skip = run([True])
    assert all(torch.equal(p0[k], p_skip[k]) for k in p0)
    assert all(float(st.get("step", 0)) == 0 and not any(float(v.abs().sum()) for k, v in st.items() if k != "step")
               for st in s_skip.values())
    p_upd, _ = run([False])
    assert any(not torch.equal(p0[k], p_upd[k]) for k in p0)
    # A skipped step in the middle is not counted: two updates, two steps of bias correction.
    _, sa = run([False, True, False])
    _, sb = run([False, False])
    assert [float(st["step"]) for st in sa.values()] == [float(st["step"]) for st in sb.values()] == [2.0, 2.0]


@pytest.mark.timeout(300)
def test_trainer_run_with_shard_local_adamw_equals_adamw_over_dtensors(demo_dir, tmp_path, monkeypatch):
    """The one-process run (dp = 1: FSDP2 DTensor parameters on a 1-rank mesh) with build_optimizer's
    ShardLocalAdamW has the losses and the checkpoint (weights and optimizer state, bitwise) of the same run
    with torch's AdamW over the DTensors."""
    from test_loop import cfg_for, read_ckpt
    from train_helpers import losses

    import train.optim as optim_mod
    from train.trainer import run

    common = ["train.steps=3", "checkpoint.every=3"]
    run(cfg_for(demo_dir, tmp_path / "local", *common))
    monkeypatch.setattr(optim_mod, "ShardLocalAdamW", torch.optim.AdamW)
    run(cfg_for(demo_dir, tmp_path / "dtensor", *common))
    assert losses(tmp_path / "local") == losses(tmp_path / "dtensor")
    a, b = (read_ckpt(tmp_path / d / "checkpoints" / "step_00000003") for d in ("local", "dtensor"))
    assert a.keys() == b.keys() and any(k.startswith("optim.state.") for k in a)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
