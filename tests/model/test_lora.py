"""LoRA on the model (model/lora.py), for every family: targets from the family's roles, B = 0 gives the base model
bitwise, frozen base weights in their dtype, stable names, merging, rslora and dropout, and one-line errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model.family import get_family
from model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    lora_modules,
    merge_lora_,
    merged_state_dict,
    merged_state_dict_from,
)
from model.parity import SampleBuilder, our_logits
from model.vlm import VLModel
from tests.model.conftest import small_vocab_cfg

# The ViT MLP projections each family names (the test's own list: the code reads them from the family's roles).
VIT_MLP = {"qwen2_vl": {"fc1", "fc2"}, "qwen2_5_vl": {"gate_proj", "up_proj", "down_proj"},
           "qwen3_vl": {"linear_fc1", "linear_fc2"}}


def _model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> VLModel:
    torch.manual_seed(seed)
    return VLModel(small_vocab_cfg(family=family)).to(dtype)


def _sample(model: VLModel, seed: int = 3):
    return SampleBuilder(model.cfg, torch.Generator().manual_seed(seed)).sample(
        5, ("image", (1, 4, 8)), 6, ("video", (2, 4, 4)), 7)


def randomize_b(model: torch.nn.Module, std: float = 0.05, seed: int = 11) -> None:
    """Non-zero B everywhere (a trained adapter), so adapter tests are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora_modules(model).items()):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def test_targets_come_from_the_family(family):
    model = _model(family)
    cfg = model.cfg
    targets = apply_lora(model, LoRAConfig(rank=4, vision=["attn", "mlp"], merger=["all"]))
    llm = {n for n, g in targets.items() if g == "llm"}
    assert llm == {f"layers.{i}.{p}" for i in range(cfg.text.num_layers) for p in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    vision = {n for n, g in targets.items() if g == "vision"}
    assert vision == {f"visual.blocks.{b}.{p}" for b in range(cfg.vision.depth) for p in
                      ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                       *(f"mlp.{n}" for n in VIT_MLP[family])]}
    merger = {n for n, g in targets.items() if g == "merger"}
    assert merger and all(n.startswith(("visual.merger.", "visual.deepstack_merger_list.")) for n in merger)
    # merger 'all' includes Qwen3-VL's DeepStack mergers (the merger group); vision 'all' does not (below).
    assert any(n.startswith("visual.deepstack_merger_list.") for n in merger) == (family == "qwen3_vl")
    assert "lm_head" not in targets
    assert set(lora_modules(model)) == set(targets)
    # Globs over the dotted suffix, per group; vision 'all' is the ViT's blocks only.
    m2 = _model(family)
    t2 = apply_lora(m2, LoRAConfig(rank=4, llm=["q_proj", "layers.1.mlp.*"], vision=["all"]))
    assert {n for n, g in t2.items() if g == "llm"} == (
        {f"layers.{i}.self_attn.q_proj" for i in range(cfg.text.num_layers)}
        | {f"layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")})
    assert not {n for n in t2 if n.startswith("visual.deepstack_merger_list.")}
    # 'attn' and 'mlp' alone.
    t3 = apply_lora(_model(family), LoRAConfig(rank=4, llm=["attn"], vision=["mlp"]))
    assert {n.rsplit(".", 2)[-2] for n, g in t3.items() if g == "llm"} == {"self_attn"}
    assert {n.rsplit(".", 1)[-1] for n, g in t3.items() if g == "vision"} == VIT_MLP[family]


def test_step0_equals_base_bitwise_frozen_base_stable_names(family):
    base = _model(family, dtype=torch.bfloat16)
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, vision=["attn", "mlp"], merger=["all"]))
    s = _sample(model)
    with torch.no_grad():
        want, _ = our_logits(base, [s], "cpu", torch.bfloat16)
        got, _ = our_logits(model, [s], "cpu", torch.bfloat16)
    assert torch.equal(got, want), f"step 0 differs from the base model: {(got - want).abs().max()}"
    # The base keys and values are unchanged; adapters add <linear>.lora_A/B.weight.
    base_sd, sd = base.state_dict(), model.state_dict()
    assert set(base_sd) < set(sd)
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    extra = set(sd) - set(base_sd)
    assert extra == set(adapter_state_dict(model)) and len(extra) == 2 * len(lora_modules(model))
    for name, p in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_adapter, name
        assert p.dtype == torch.bfloat16, name  # base kept in the training dtype, adapters made in it
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == sum(p.numel() for p in adapter_state_dict(model).values())
    assert n_train < sum(p.numel() for p in model.parameters()) / 5
    # A is drawn like peft's default, B is zero.
    m = lora_modules(model)["layers.0.self_attn.q_proj"]
    assert m.lora_B.weight.abs().max() == 0
    bound = 1 / math.sqrt(m.in_features)
    assert 0.5 * bound < m.lora_A.weight.float().abs().max() <= bound


def test_adapters_do_not_depend_on_the_device_path(family):
    """Built on meta, moved to CPU and initialized: the same adapters as a model built on the CPU (each A is drawn
    from its own name-seeded generator), so every layout and the meta path start alike."""
    cpu = _model(family)
    apply_lora(cpu, LoRAConfig(rank=4, vision=["mlp"]), seed=5)
    with torch.device("meta"):
        meta = VLModel(small_vocab_cfg(family=family))
    apply_lora(meta, LoRAConfig(rank=4, vision=["mlp"]), seed=5)
    meta.to_empty(device="cpu")
    meta.init_weights()
    a, b = adapter_state_dict(cpu), adapter_state_dict(meta)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _model(family)
    apply_lora(other, LoRAConfig(rank=4, vision=["mlp"]), seed=6)
    assert not torch.equal(adapter_state_dict(other)["layers.0.self_attn.q_proj.lora_A.weight"],
                           a["layers.0.self_attn.q_proj.lora_A.weight"])


def test_merge_equals_unmerged_within_fp32_rounding(family):
    model = _model(family)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, vision=["attn", "mlp"], merger=["all"]))
    randomize_b(model)
    s = _sample(model)
    base = _model(family)
    with torch.no_grad():
        lora_out, _ = our_logits(model, [s], "cpu", torch.float32)
        base_out, _ = our_logits(base, [s], "cpu", torch.float32)
        # A plain model loaded from the merged state dict, and the model merged in place.
        plain = _model(family, seed=9)
        plain.load_state_dict(merged_state_dict(model), strict=True)
        from_sd = merged_state_dict_from(model.state_dict(), model_scaling(model))
        assert all(torch.equal(from_sd[k], v) for k, v in merged_state_dict(model).items())
        plain_out, _ = our_logits(plain, [s], "cpu", torch.float32)
        merge_lora_(model)
        merged_out, _ = our_logits(model, [s], "cpu", torch.float32)
    assert not lora_modules(model) and not any(".lora_" in k for k in model.state_dict())
    effect = (lora_out - base_out).abs().max().item()
    assert effect > 1e-2, f"the adapters barely change the logits ({effect:.2e}): the test would be vacuous"
    for out in (plain_out, merged_out):
        diff = (out - lora_out).abs().max().item()
        assert diff <= 1e-5 * lora_out.abs().max().item(), diff
    print(f"merged vs unmerged max abs logit diff {diff:.3e} (adapter effect {effect:.3e})")


def model_scaling(model) -> dict[str, float]:
    return {n: m.scaling for n, m in lora_modules(model).items()}


def test_rslora_scaling_and_dropout():
    assert LoRAConfig(rank=16, alpha=32).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scaling == 8.0
    model = _model("qwen2_vl")
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.5, rslora=True))
    assert all(m.scaling == 4.0 for m in lora_modules(model).values())
    randomize_b(model)
    s = _sample(model)
    ref = copy.deepcopy(model)
    for m in lora_modules(ref).values():
        m.lora_dropout = torch.nn.Identity()
    with torch.no_grad():
        model.eval()
        assert torch.equal(our_logits(model, [s], "cpu", torch.float32)[0], our_logits(ref, [s], "cpu",
                                                                                       torch.float32)[0])
        model.train()
        torch.manual_seed(0)
        train_out = our_logits(model, [s], "cpu", torch.float32)[0]
    assert not torch.allclose(train_out, our_logits(ref, [s], "cpu", torch.float32)[0].detach())


def test_fully_trainable_groups_keep_their_gradients():
    model = _model("qwen2_vl")
    apply_lora(model, LoRAConfig(rank=4, fully_trainable=["merger"]), frozen_groups=("vision",))
    family = get_family("qwen2_vl")
    for name, p in model.named_parameters():
        want = ".lora_" in name or family.group_of(name) == "merger"
        assert p.requires_grad == want, name


@pytest.mark.parametrize("kwargs,frozen,match", [
    ({"rank": 0}, (), r"lora\.rank=0: must be a positive integer"),
    ({"rank": -4}, (), r"lora\.rank=-4"),
    ({"alpha": 0}, (), r"lora\.alpha=0"),
    ({"dropout": 1.0}, (), r"lora\.dropout=1\.0"),
    ({"llm": ["q_prj"]}, (), r"lora\.llm: target 'q_prj' matches no linear projection of the llm group"),
    ({"merger": ["attn"]}, (), r"lora\.merger: target 'attn' matches no linear projection"),
    ({"llm": ["lm_head"]}, (), r"lora\.llm: target 'lm_head' matches no"),
    ({"vision": ["attn"]}, ("vision",), r"lora\.vision=\['attn'\] puts adapters on the vision group, which this "
                                        r"stage freezes"),
    ({"fully_trainable": ["merger"]}, ("merger",), r"lora\.fully_trainable names 'merger', which this stage freezes"),
    ({"merger": ["all"], "fully_trainable": ["merger"]}, (), r"lora\.merger also targets"),
    ({"llm": []}, (), r"no targets in any group"),
])
def test_bad_input_is_one_line(kwargs, frozen, match):
    with pytest.raises(ValueError, match=match) as e:
        apply_lora(_model("qwen2_vl"), LoRAConfig(**{**{"rank": 4}, **kwargs}) if "rank" not in kwargs
                   else LoRAConfig(**kwargs), frozen_groups=frozen)
    assert "\n" not in str(e.value)


def test_applies_once():
    model = _model("qwen2_vl")
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
    assert isinstance(model.layers["0"].mlp.up_proj, LoRALinear)
