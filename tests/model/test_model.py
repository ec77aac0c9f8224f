"""Model construction and input checks, for every family: meta-device presets with the published (and transformers')
parameter counts, deferred init, placeholder/embedding counts, the zero-weight vision pass of text-only batches."""

from __future__ import annotations

import resource

import pytest
import torch

from model.family import get_family, get_preset, hf_config_dict
from model.loss import model_loss
from model.parity import SampleBuilder, hf_class
from model.vlm import VLModel
from tests.model.conftest import small_vocab_cfg

# Published parameter counts (the model cards), in billions, and the presets that tie their head.
PUBLISHED = {
    ("qwen2_vl", "2b"): 2.21, ("qwen2_vl", "7b"): 8.29, ("qwen2_vl", "72b"): 73.4,
    ("qwen2_5_vl", "3b"): 3.75, ("qwen2_5_vl", "7b"): 8.29, ("qwen2_5_vl", "32b"): 33.4, ("qwen2_5_vl", "72b"): 73.4,
    ("qwen3_vl", "2b"): 2.13, ("qwen3_vl", "4b"): 4.44, ("qwen3_vl", "8b"): 8.77, ("qwen3_vl", "32b"): 33.4,
}
TIED = {("qwen2_vl", "2b"), ("qwen2_5_vl", "3b"), ("qwen3_vl", "2b"), ("qwen3_vl", "4b")}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_72b_builds_on_meta_without_allocating():
    before = _rss_mb()
    with torch.device("meta"):
        model = VLModel(get_preset("qwen2_vl", "72b"))
    grown = _rss_mb() - before
    n = sum(p.numel() for p in model.parameters())
    assert 73.0e9 < n < 73.8e9  # Qwen2-VL-72B: 73.4B parameters
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert grown < 200, f"building 72B on meta grew RSS by {grown:.0f} MB"  # fp32 weights would be 290 GB


@pytest.mark.parametrize("family_preset", sorted(PUBLISHED))
def test_presets_have_the_published_and_transformers_parameter_counts(family_preset):
    """Each preset built by us and by transformers (from our config.json mapping) on the meta device: the same
    parameter count, and the model card's."""
    from transformers import AutoConfig

    family, name = family_preset
    cfg = get_preset(family, name)
    d = hf_config_dict(cfg)
    with torch.device("meta"):
        ours = VLModel(cfg)
        theirs = hf_class(family)._from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n / 1e9 - PUBLISHED[family_preset]) < 0.06, n
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == (family_preset in TIED)


def test_to_empty_then_init_weights_gives_a_working_model(family):
    cfg = small_vocab_cfg(family=family)
    with torch.device("meta"):
        model = VLModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = VLModel(cfg)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(fresh.named_buffers())[name], rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight") or "layernorm" in name:
            assert (p == 1).all(), name
    ids = torch.randint(0, 2000, (20,))
    h = model(input_ids=ids)
    assert h.shape == (20, cfg.text.hidden_size) and torch.isfinite(h).all()


def _image_sample(cfg):
    return SampleBuilder(cfg, torch.Generator().manual_seed(0)).sample(4, ("image", (1, 4, 4)), 3)


def test_pad_count_mismatch_raises_with_both_numbers(family):
    cfg = small_vocab_cfg(family=family)
    model = VLModel(cfg)
    s = _image_sample(cfg)
    ids = s.input_ids.clone()
    ids[torch.nonzero(ids == cfg.image_token_id)[0]] = 5  # one placeholder fewer than the ViT's 4 tokens
    with pytest.raises(ValueError, match=r"3 <\|image_pad\|> tokens in input_ids, 4 embeddings"):
        model(input_ids=ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw)
    with pytest.raises(ValueError, match=r"4 <\|image_pad\|> and 0 <\|video_pad\|> tokens but no pixel_values"):
        model(input_ids=s.input_ids)
    # Pads without any pixels: the video path reports its count too.
    vid_ids = torch.cat([s.input_ids, torch.full((2,), cfg.video_token_id)])
    with pytest.raises(ValueError, match=r"2 <\|video_pad\|> tokens in input_ids, 0 embeddings"):
        model(input_ids=vid_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw)


def test_text_only_batch_gives_vision_a_zero_gradient(family):
    """Every rank runs the same vision graph: a text-only microbatch still reaches every ViT parameter (DeepStack
    mergers and the position table included)."""
    cfg = small_vocab_cfg(family=family)
    model = VLModel(cfg)
    ids = torch.randint(0, 2000, (16,))
    labels = torch.randint(0, 2000, (16,))
    loss, n = model_loss(model, labels, input_ids=ids)
    loss.backward()
    for name, p in model.visual.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    assert model.layers["0"].mlp.up_proj.weight.grad.abs().sum() > 0


def test_bf16_cast_keeps_rotary_angles(family):
    cfg = small_vocab_cfg(family=family)
    model = VLModel(cfg)
    s = _image_sample(cfg)
    pos = get_family(family).processing(cfg).position_ids(s.input_ids, s.image_grid_thw)
    cos32, _ = model.rotary(pos * 997, torch.float32)
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.bfloat16  # what nn.Module.to does to buffers...
    cos16, _ = model.rotary(pos * 997, torch.float32)
    torch.testing.assert_close(cos16, cos32, rtol=0, atol=0)  # ...but the angles stay fp32-exact


def test_peak_rss_helper_is_meaningful():
    # Guard for the meta test: RSS does grow when real memory is allocated (so "< 200 MB" can fail).
    before = _rss_mb()
    x = torch.ones(300 * 2**20 // 4)
    assert _rss_mb() - before > 250
    del x
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
