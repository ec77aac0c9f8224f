"""Model construction and input checks: meta-device presets, deferred init, placeholder/embedding counts."""

from __future__ import annotations

import resource

import pytest
import torch

from model.config import get_preset
from model.loss import model_loss
from model.parity import SampleBuilder
from model.position_ids import mrope_position_ids
from model.qwen2_vl import Qwen2VL
from tests.model.conftest import small_vocab_cfg


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_72b_builds_on_meta_without_allocating():
    before = _rss_mb()
    with torch.device("meta"):
        model = Qwen2VL(get_preset("72b"))
    grown = _rss_mb() - before
    n = sum(p.numel() for p in model.parameters())
    assert 73.0e9 < n < 73.8e9  # Qwen2-VL-72B: 73.4B parameters
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert grown < 200, f"building 72B on meta grew RSS by {grown:.0f} MB"  # fp32 weights would be 290 GB
    del model
    # Published sizes of the other presets (2B ties its head).
    with torch.device("meta"):
        m2, m7 = Qwen2VL(get_preset("2b")), Qwen2VL(get_preset("7b"))
    assert m2.lm_head.weight is m2.embed_tokens.weight
    assert 2.20e9 < sum(p.numel() for p in m2.parameters()) < 2.22e9
    assert 8.28e9 < sum(p.numel() for p in m7.parameters()) < 8.30e9


def test_to_empty_then_init_weights_gives_a_working_model():
    cfg = small_vocab_cfg()
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = Qwen2VL(cfg)
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


def test_pad_count_mismatch_raises_with_both_numbers():
    cfg = small_vocab_cfg()
    model = Qwen2VL(cfg)
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


def test_text_only_batch_gives_vision_a_zero_gradient():
    """Every rank runs the same vision graph: a text-only microbatch still reaches every ViT parameter."""
    cfg = small_vocab_cfg()
    model = Qwen2VL(cfg)
    ids = torch.randint(0, 2000, (16,))
    labels = torch.randint(0, 2000, (16,))
    loss, n = model_loss(model, labels, input_ids=ids)
    loss.backward()
    for name, p in model.visual.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    assert model.layers["0"].mlp.up_proj.weight.grad.abs().sum() > 0


def test_bf16_cast_keeps_rotary_angles():
    cfg = small_vocab_cfg()
    model = Qwen2VL(cfg)
    s = _image_sample(cfg)
    pos = mrope_position_ids(s.input_ids, s.image_grid_thw, image_token_id=cfg.image_token_id)
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
