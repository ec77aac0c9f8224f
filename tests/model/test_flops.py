"""model/flops.py against torch.utils.flop_counter.FlopCounterMode on the tiny model of every family (Qwen2.5-VL's
window blocks, Qwen3-VL's DeepStack mergers, head_dim != hidden / heads included), and against the real parameter
counts of the published presets.

FlopCounterMode does not see CPU SDPA (aten._scaled_dot_product_flash_attention_for_cpu has no FLOP
formula), so for the count the test swaps the attention kernel for a plain per-segment softmax(QK^T)V whose
two matmuls the counter does see. Every other op runs as in training, backward included (the fused loss
head's three matmuls too). The expected agreement is EXACT: both count the same matmuls.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model.text as text
import model.vision as vision
from core.batch import IGNORE_INDEX
from model.family import GROUPS, get_family, get_preset
from model.flops import (
    ATTENTION_CONVENTIONS,
    batch_flops,
    llm_flops_per_token,
    llm_forward_flops,
    vit_flops_per_patch,
)
from model.loss import model_loss
from model.parity import SampleBuilder
from model.vlm import VLModel
from tests.model.conftest import small_cfg, small_vocab_cfg


def matmul_attention(q, k, v, cu_seqlens, max_seqlen, *, causal, backend=None, scale=None):
    """Dense per-segment attention built from matmuls (what the FLOP counter can count)."""
    rep = q.shape[1] // k.shape[1]
    out = []
    b = cu_seqlens.tolist()
    for s, e in zip(b[:-1], b[1:]):
        q_HLD = q[s:e].transpose(0, 1)
        k_HLD = k[s:e].repeat_interleave(rep, 1).transpose(0, 1)
        v_HLD = v[s:e].repeat_interleave(rep, 1).transpose(0, 1)
        a = q_HLD @ k_HLD.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            a = a.masked_fill(~torch.ones(e - s, e - s, dtype=torch.bool).tril(), float("-inf"))
        out.append((a.softmax(-1) @ v_HLD).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def packed_batch(family):
    cfg = small_vocab_cfg(family=family)
    b = SampleBuilder(cfg, torch.Generator().manual_seed(0))
    samples = [b.sample(7, ("image", (1, 4, 6)), 9), b.sample(5, ("video", (3, 4, 4)), 4), b.sample(30),
               b.sample(2, ("image", (1, 8, 4)), ("image", (1, 2, 2)), 3)]
    ids = torch.cat([s.input_ids for s in samples])
    lengths = [s.input_ids.numel() for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    g_img = torch.cat([s.image_grid_thw for s in samples if s.image_grid_thw is not None])
    g_vid = torch.cat([s.video_grid_thw for s in samples if s.video_grid_thw is not None])
    labels = torch.randint(0, 1000, ids.shape)
    labels[torch.rand(ids.shape) < 0.4] = IGNORE_INDEX
    batch = dict(
        input_ids=ids, labels=labels, cu_seqlens=cu, max_seqlen=max(lengths),
        position_ids=get_family(family).processing(cfg).packed_position_ids(
            ids, cu, g_img, g_vid, [x for s in samples for x in (s.video_seconds or [])]),
        pixel_values=torch.cat([s.pixel_values for s in samples if s.pixel_values is not None]), image_grid_thw=g_img,
        pixel_values_videos=torch.cat([s.pixel_values_videos for s in samples if s.pixel_values_videos is not None]),
        video_grid_thw=g_vid,
    )
    return cfg, batch


# Stage 2 (all), stage 1 (LLM frozen), stage 3 (vision frozen), merger only, merger + LLM, inference.
TRAINABLE = [GROUPS, ("vision", "merger"), ("llm",), ("merger",), ("merger", "llm"), ()]


@pytest.mark.parametrize("trainable", TRAINABLE, ids=lambda t: "+".join(t) or "none")
def test_matches_flop_counter_exactly(monkeypatch, packed_batch, trainable):
    monkeypatch.setattr(text, "varlen_attention", matmul_attention)
    monkeypatch.setattr(vision, "varlen_attention", matmul_attention)
    cfg, batch = packed_batch
    model = VLModel(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(get_family(cfg.family).group_of(name) in trainable)
    with FlopCounterMode(display=False) as counter:
        loss, n = model_loss(model, **batch)
        if loss.requires_grad:
            loss.backward()
    want = batch_flops(cfg, batch["cu_seqlens"], [batch["image_grid_thw"], batch["video_grid_thw"]],
                       n_supervised=int(n), trainable=trainable, attention="doc_full")
    assert counter.get_total_flops() == want["total"]
    assert want["total"] == want["vit"] + want["llm"] and want["vit"] > 0 and want["llm"] > 0


def test_attention_conventions_count_what_they_say(packed_batch):
    cfg, batch = packed_batch
    cu = batch["cu_seqlens"]
    lengths = cu.diff().tolist()
    per_layer = cfg.text.num_layers * 4 * cfg.text.num_heads * cfg.text.head_dim
    got = {a: llm_forward_flops(cfg, lengths, attention=a)["layers_attention"] for a in ATTENTION_CONVENTIONS}
    assert got["doc_full"] == per_layer * sum(L * L for L in lengths)
    assert got["doc_causal"] == per_layer * sum(L * (L + 1) // 2 for L in lengths)
    # Packing: attention of 4 samples costs the sum of their squares, not the square of the packed length, which
    # is what torchtitan's convention counts.
    T = sum(lengths)
    assert got["packed_full"] == per_layer * T * T
    assert got["doc_full"] < per_layer * T * T / 2
    with pytest.raises(ValueError, match="attention='dense'; choose one of"):
        llm_forward_flops(cfg, lengths, attention="dense")


def test_conventions_by_hand_on_a_tiny_decoder():
    """Two documents of 3 and 5 tokens, 3 supervised, through a 1-layer decoder (width 8, 2 heads of 4, 1 kv
    head, MLP 16, vocabulary 10), everything trainable, no images: every figure written out by hand."""
    import dataclasses

    cfg = small_cfg()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=1, hidden_size=8, num_heads=2,
                                                            num_kv_heads=1, intermediate_size=16, vocab_size=10))
    assert cfg.text.head_dim == 4
    # Forward: q, o (8 x 8 each) and k, v (8 x 4 each) and gate, up, down (8 x 16 each) on 8 tokens.
    linear = 2 * 8 * (8 * 8 + 8 * 8 + 8 * 4 + 8 * 4 + 3 * 8 * 16)  # 9216
    head = 2 * 3 * 8 * 10  # supervised rows only: 480
    # QK^T and PV: 2 matmuls x 2 FLOPs x pairs x (2 heads x 4 dims) = 32 x pairs.
    pairs = {"doc_causal": 3 * 4 // 2 + 5 * 6 // 2,  # 6 + 15 = 21: each document's causal triangle
             "doc_full": 3 * 3 + 5 * 5,  # 34: each document's square
             "packed_full": 8 * 8}  # 64: the packed row as one sequence (torchtitan)
    for attention, n in pairs.items():
        f = batch_flops(cfg, [0, 3, 8], [], n_supervised=3, attention=attention)
        # Forward + backward = 3 x forward: the input and the weight gradient of every matmul.
        assert f["llm"] == 3 * (linear + 32 * n + head), attention
        assert f["total"] == f["llm"] and f["vit"] == 0 and f["tokens"] == 8
    # MFU of a step of 2 such microbatches in 1 ms on a 1 TFLOP/s device (doc_causal): 2 x 31,104 / 1e9.
    f = batch_flops(cfg, [0, 3, 8], [], n_supervised=3)
    assert 2 * f["total"] / 1e-3 / 1e12 == pytest.approx(2 * 3 * (9216 + 32 * 21 + 480) / 1e9)


@pytest.mark.parametrize("family_preset", [("qwen2_vl", "2b"), ("qwen2_vl", "72b"), ("qwen2_5_vl", "7b"),
                                           ("qwen3_vl", "8b")])
def test_linear_flops_are_six_times_the_real_parameters(family_preset):
    """At the published sizes, the decoder's matmul FLOPs per token are 6 x its non-embedding matmul
    parameters (fwd 2N + bwd 4N), counted from the model built on the meta device."""
    cfg = get_preset(*family_preset)
    with torch.device("meta"):
        model = VLModel(cfg)
    n_linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    T = 4096
    f = llm_forward_flops(cfg, [T], n_supervised=0)
    assert f["layers_linear"] == 2 * n_linear * T
    n_vit = sum(m.weight.numel() for name, m in model.visual.named_modules()
                if isinstance(m, torch.nn.Linear) and "merger" not in name)
    n_mergers = sum(m.weight.numel() for name, m in model.visual.named_modules()
                    if isinstance(m, torch.nn.Linear) and "merger" in name)
    per_patch = vit_flops_per_patch(cfg, (32, 32))
    # 6 N per patch for linears + patch embed (2x: input is data) + mergers (6 N per merged token, a quarter of
    # the patches) + attention on 1024-patch frames (Qwen2.5-VL: mostly 64-patch windows)
    assert 6 * n_vit + 6 * n_mergers / 4 < per_patch < (6 * n_vit + 6 * n_mergers / 4) * 1.6
    # Per-token figure for MFU: 6 N + attention + head, within the familiar range.
    n_head = cfg.text.vocab_size * cfg.text.hidden_size
    assert 6 * (n_linear + n_head) < llm_flops_per_token(cfg, T) < 6 * (n_linear + n_head) * 1.3


def test_unknown_group_is_an_error():
    with pytest.raises(ValueError, match="unknown trainable groups"):
        batch_flops(small_cfg(), [0, 4], trainable=("vit",))


def test_packed_full_is_torchtitans_formula():
    """A text-only packed row of documents, every token through the head: packed_full gives torchtitan's
    count, T x (6 N + 12 l h q T) with N the decoder's and head's matmul weights and T the packed length (its
    seq_len), whatever the documents; doc_causal is smaller by the attention outside each document's triangle."""
    cfg = small_cfg()
    with torch.device("meta"):
        model = VLModel(cfg)
    n = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    n += model.lm_head.weight.numel()
    t = cfg.text
    lengths = [37, 5, 120, 2]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    T = sum(lengths)
    lhq = t.num_layers * t.num_heads * t.head_dim
    titan = T * (6 * n + 12 * lhq * T)
    assert batch_flops(cfg, cu, [], attention="packed_full")["total"] == titan
    doc = batch_flops(cfg, cu, [])["total"]
    assert titan - doc == 12 * lhq * (T * T - sum(L * (L + 1) // 2 for L in lengths))
