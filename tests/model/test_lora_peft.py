"""LoRA against peft (the oracle), for every family: our adapted model equals peft's `get_peft_model` on transformers'
model of the same checkpoint with the same adapter weights (logits and adapter gradients); the adapter directory
we write is what `PeftModel.from_pretrained` loads to our logits, one peft writes reads into ours, an adapter for
another base is refused naming the module; the merged HF export gives the unmerged model's logits."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from core.batch import IGNORE_INDEX
from model.hf_adapter import CheckpointMismatchError, from_hf_state_dict, read_hf_tensors, save_hf_checkpoint
from model.lora import LoRAConfig, adapter_state_dict, apply_lora, lora_modules, merged_state_dict
from model.lora_peft import load_peft_adapter, save_peft_adapter, to_peft
from model.loss import model_loss
from model.parity import SampleBuilder, hf_class, hf_logits, mm_token_type_ids, our_logits, sample_positions
from model.vlm import VLModel
from tests.model.conftest import small_cfg
from tests.model.test_lora import randomize_b

LOGIT_ATOL = 1e-5  # fp32 rounding: the base models alone agree to ~4e-7 on these logits (|logit| < 1)


def _ours(hf, family: str, lcfg: LoRAConfig, seed: int = 0) -> VLModel:
    model = VLModel(small_cfg(family))
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), False), strict=True)
    apply_lora(model, lcfg, seed=seed)
    return model


def _sample(cfg, seed: int = 4):
    return SampleBuilder(cfg, torch.Generator().manual_seed(seed)).sample(
        6, ("image", (1, 4, 6)), 5, ("video", (3, 4, 4)), 9)


def _logit_diff(ours: VLModel, hf_model, cfg, s) -> tuple[float, float]:
    """(max |ours - transformers| over the logits, max |logit|)."""
    with torch.no_grad():
        mine, _ = our_logits(ours, [s], "cpu", torch.float32)
        theirs = hf_logits(hf_model, s, cfg, sample_positions(s, cfg), "cpu", torch.float32)
    return (mine - theirs).abs().max().item(), theirs.abs().max().item()


def test_logits_and_adapter_grads_equal_peft(hf_tiny, family):
    lcfg = LoRAConfig(rank=4, alpha=8, vision=["attn", "mlp"], merger=["all"])
    ours = _ours(hf_tiny, family, lcfg)
    randomize_b(ours)
    cfg = ours.cfg
    tensors, pcfg = to_peft(adapter_state_dict(ours), cfg, lcfg)
    peft_model = get_peft_model(copy.deepcopy(hf_tiny), LoraConfig(
        r=pcfg["r"], lora_alpha=pcfg["lora_alpha"], target_modules=pcfg["target_modules"],
        rank_pattern=pcfg["rank_pattern"], alpha_pattern=pcfg["alpha_pattern"], lora_dropout=0.0))
    res = set_peft_model_state_dict(peft_model, tensors)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k], res
    hf = peft_model.get_base_model()
    s = _sample(cfg)
    base_effect = _logit_diff(ours, hf_tiny, cfg, s)[0]  # hf_tiny: the base model, no adapters
    diff, scale = _logit_diff(ours, hf, cfg, s)
    print(f"{family}: logits max abs diff vs peft {diff:.3e} (max |logit| {scale:.2f}, adapters move logits by "
          f"{base_effect:.3e})")
    assert base_effect > 100 * LOGIT_ATOL, "the adapters barely change the logits: the test would be vacuous"
    assert diff <= LOGIT_ATOL

    # Gradients of the adapters: the same loss through both.
    gen = torch.Generator().manual_seed(5)
    lab = s.input_ids.clone()
    lab[(lab == cfg.image_token_id) | (lab == cfg.video_token_id) | (torch.rand(lab.shape, generator=gen) < 0.5)] = (
        IGNORE_INDEX)
    pos = sample_positions(s, cfg)
    hf.model.rope_deltas = None
    out = hf(input_ids=s.input_ids[None], labels=lab[None], position_ids=pos[:, None, :],
             mm_token_type_ids=mm_token_type_ids(s.input_ids, cfg)[None], pixel_values=s.pixel_values,
             image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
             video_grid_thw=s.video_grid_thw, use_cache=False)
    out.loss.backward()
    shifted = torch.cat([lab[1:], torch.tensor([IGNORE_INDEX])])
    loss_sum, n = model_loss(ours, shifted, input_ids=s.input_ids, position_ids=pos, pixel_values=s.pixel_values,
                             image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
                             video_grid_thw=s.video_grid_thw)
    (loss_sum / n).backward()
    assert abs((loss_sum / n).item() - out.loss.item()) <= 1e-5
    peft_grads = {k.replace(".default", ""): p.grad for k, p in peft_model.named_parameters() if "lora_" in k}
    our_grads, _ = to_peft({k: p.grad for k, p in ours.named_parameters() if ".lora_" in k}, cfg, lcfg)
    # A fused ViT qkv adapter is block-diagonal in ours: compare B where ours has parameters (peft's zero blocks
    # of B are parameters of its own that get gradients).
    mask, _ = to_peft({k: torch.ones_like(p) for k, p in ours.named_parameters() if ".lora_" in k}, cfg, lcfg)
    assert peft_grads.keys() == our_grads.keys(), sorted(peft_grads.keys() ^ our_grads.keys())
    worst = 0.0
    for k, g in our_grads.items():
        ref = peft_grads[k] * mask[k]
        scale = ref.abs().max().item()
        assert scale > 0 or ".visual." in k, f"{k}: zero gradient, the comparison would be vacuous"
        d = (g - ref).abs().max().item()
        worst = max(worst, d / max(scale, 1e-30))
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 + 1e-4 * scale, msg=lambda m, k=k: f"{k}: {m}")
    print(f"{family}: adapter gradients max rel diff vs peft {worst:.3e} over {len(our_grads)} tensors")


def test_adapter_dir_loads_in_peft_and_back(tmp_path, hf_tiny, family):
    """Ours -> adapter_config.json + adapter_model.safetensors -> PeftModel.from_pretrained: our logits; the same
    directory back into ours: bitwise the same adapters (q and v of the ViT attention: a block-diagonal qkv of rank
    2r; the merger trained in full: modules_to_save)."""
    lcfg = LoRAConfig(rank=4, alpha=8, rslora=True, vision=["q_proj", "v_proj", "mlp"], fully_trainable=["merger"])
    ours = _ours(hf_tiny, family, lcfg)
    randomize_b(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.startswith(("visual.merger.", "visual.deepstack_merger_list.")):  # the merger group
                p.add_(0.05 * torch.randn_like(p))
    files = save_peft_adapter(ours, lcfg, tmp_path / "adapter", base_model="tiny")
    assert sorted(f.name for f in files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    levels = len(ours.cfg.vision.deepstack_visual_indexes)
    deepstack = [f"model.visual.deepstack_merger_list.{j}" for j in range(levels)]
    merger_modules = ["model.visual.merger", *deepstack]  # the merger group, one module each (peft wraps no lists)
    assert config["use_rslora"] and sorted(config["modules_to_save"]) == sorted(merger_modules)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_tiny), str(tmp_path / "adapter"))
    diff, _ = _logit_diff(ours, peft_model.get_base_model(), ours.cfg, _sample(ours.cfg))
    print(f"{family}: PeftModel.from_pretrained(our adapter dir) logits max abs diff {diff:.3e}")
    assert diff <= LOGIT_ATOL
    other = _ours(hf_tiny, family, lcfg, seed=7)
    counts = load_peft_adapter(other, tmp_path / "adapter")
    assert counts["full"] > 0
    a, b = adapter_state_dict(ours), adapter_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merger = {k: v for k, v in ours.state_dict().items() if k.startswith("visual.merger.")}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in merger.items())
    # A fused qkv adapter of rank 2r whose B is not block-diagonal (q's rows reading v's A) cannot be split into
    # rank-r adapters: refused, not truncated.
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("blocks.0.attn.qkv.lora_B.weight"))
    tensors[key][0, -1] = 0.1
    (tmp_path / "mixed").mkdir()
    save_file(tensors, str(tmp_path / "mixed" / "adapter_model.safetensors"))
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", tmp_path / "mixed")
    with pytest.raises(CheckpointMismatchError, match=r"attn\.qkv \(rank 8\) is not block-diagonal over q/k/v"):
        load_peft_adapter(other, tmp_path / "mixed")


def _peft_native(tmp_path, hf_tiny) -> tuple[PeftModel, str]:
    """An adapter written by peft itself (its fused qkv: one A shared by q/k/v), random A and B."""
    names = [n for n, m in hf_tiny.named_modules() if isinstance(m, torch.nn.Linear)
             and (".layers." in n or ".blocks." in n)]
    peft_model = get_peft_model(copy.deepcopy(hf_tiny), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path / "peft_native"
    peft_model.save_pretrained(str(out))
    return peft_model, str(out)


def test_peft_written_adapter_reads_into_ours(tmp_path, hf_tiny, family):
    peft_model, path = _peft_native(tmp_path, hf_tiny)
    lcfg = LoRAConfig(rank=4, alpha=8, vision=["attn", "mlp"])
    ours = _ours(hf_tiny, family, lcfg)
    load_peft_adapter(ours, path)
    diff, _ = _logit_diff(ours, peft_model.get_base_model(), ours.cfg, _sample(ours.cfg))
    print(f"{family}: peft's own adapter read into ours: logits max abs diff {diff:.3e}")
    assert diff <= LOGIT_ATOL
    # Other lora settings than the adapter's: one line naming the module and the fix.
    for bad, match in ((LoRAConfig(rank=4, alpha=16, vision=["attn", "mlp"]), r"scales by 2 .* by 4; set lora\.alpha"),
                       (LoRAConfig(rank=4, alpha=8),
                        r"has an adapter on model\.visual\.blocks\.0\.attn\.proj, which this model's lora config "
                        r"does not target"),
                       (LoRAConfig(rank=4, alpha=8, vision=["all"], merger=["all"]), r"has no adapter for")):
        with pytest.raises(CheckpointMismatchError, match=match) as e:
            load_peft_adapter(_ours(hf_tiny, family, bad), path)
        assert "\n" not in str(e.value)


def test_adapter_for_another_base_is_refused(tmp_path, family):
    """An adapter of a model with another MLP width: refused before anything is copied, naming the first module
    whose shape differs."""
    lcfg = LoRAConfig(rank=4, alpha=8)
    wide_cfg = small_cfg(family)
    wide_cfg.text.intermediate_size = 128
    wide = VLModel(wide_cfg)
    apply_lora(wide, lcfg)
    save_peft_adapter(wide, lcfg, tmp_path / "wide")
    ours = VLModel(small_cfg(family))
    apply_lora(ours, lcfg, seed=1)
    before = adapter_state_dict(ours)
    with pytest.raises(CheckpointMismatchError, match=r"model\.language_model\.layers\.0\.mlp\.down_proj has lora_A "
                                                      r"\(4, 128\) .* layers\.0\.mlp\.down_proj needs \(4, 96\)") as e:
        load_peft_adapter(ours, tmp_path / "wide")
    assert "\n" not in str(e.value)
    after = adapter_state_dict(ours)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused adapter must not be half loaded"


def test_merged_export_loads_in_transformers(tmp_path, hf_tiny, family):
    lcfg = LoRAConfig(rank=4, alpha=8, vision=["attn", "mlp"], merger=["all"])
    ours = _ours(hf_tiny, family, lcfg)
    randomize_b(ours)
    save_hf_checkpoint(merged_state_dict(ours), ours.cfg, tmp_path / "merged")
    keys = set(read_hf_tensors(tmp_path / "merged"))
    assert not any("lora" in k for k in keys)
    hf = hf_class(family).from_pretrained(str(tmp_path / "merged"), dtype=torch.float32,
                                          attn_implementation="eager").eval()
    s = _sample(ours.cfg)
    diff, scale = _logit_diff(ours, hf, ours.cfg, s)
    base_effect = _logit_diff(ours, hf_tiny, ours.cfg, s)[0]
    print(f"{family}: merged HF export vs unmerged ours: logits max abs diff {diff:.3e} (max |logit| {scale:.2f}, "
          f"adapter effect {base_effect:.3e})")
    assert base_effect > 100 * LOGIT_ATOL and diff <= LOGIT_ATOL
    assert len(lora_modules(ours)) > 0
