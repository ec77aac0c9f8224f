"""The host-built model inputs of the sync-free step (issue 19): VLModel.host_inputs (the ViT's plan, the
placeholder counts) and model.loss.supervised_positions give bitwise the outputs, loss and gradients of the path
that finds them on the device, for every family (Qwen2.5-VL's window order, Qwen3-VL's position-table taps), on
image, video, mixed and text-only microbatches; their checks keep their one-line errors. That nothing is read back
with them is benchmarks/sync_count.py's check (tests/benchmarks/test_sync_count.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.batch import IGNORE_INDEX
from model.loss import lm_loss, supervised_positions
from model.vision import VisionPlan
from model.vlm import VLModel
from tests.parallel._synth import global_batch, tiny_config


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_host_built_inputs_give_bitwise_the_same_outputs_loss_and_grads(family):
    torch.manual_seed(0)
    model = VLModel(tiny_config(family=family))
    for mb in global_batch(0, 5, family=family):  # image, text-only, video, two images, text-only
        results = []
        for prepared in (False, True):
            model.zero_grad()
            kw = mb.model_inputs()
            sel = None
            if prepared:
                kw.update(model.host_inputs(mb.input_ids, mb.image_grid_thw, mb.video_grid_thw))
                sel = supervised_positions(mb.labels, model.cfg.text.vocab_size)
                assert isinstance(kw["vision_plan"], VisionPlan)
            h = model(**kw)
            loss, n = lm_loss(h, model.lm_head.weight, mb.labels, supervised_idx=sel)
            loss.backward()
            results.append((h.detach(), loss.detach(), int(n),
                            {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        (h0, l0, n0, g0), (h1, l1, n1, g1) = results
        assert torch.equal(h0, h1) and torch.equal(l0, l1) and n0 == n1 == mb.num_supervised
        assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_the_plan_moves_every_tensor_and_keeps_the_rest():
    model = VLModel(tiny_config(family="qwen2_5_vl"))
    mb = global_batch(0, 1, family="qwen2_5_vl")[0]
    plan = model.host_inputs(mb.input_ids, mb.image_grid_thw, mb.video_grid_thw)["vision_plan"]
    assert plan.rows is not None and len(plan.cu) == 2  # window attention and the full-attention blocks
    moved = plan.to("meta")
    assert moved.pos_N2.is_meta and moved.rows.is_meta and all(c.is_meta for c in moved.cu)
    assert moved.max_len == plan.max_len and moved.block_segments == plan.block_segments
    batch = dataclasses.replace(mb, prepared={"vision_plan": plan, "placeholder_counts": (4, 0)})
    on_meta = batch.map_device_tensors(lambda t: t.to("meta"))
    assert on_meta.prepared["vision_plan"].pos_N2.is_meta and on_meta.prepared["placeholder_counts"] == (4, 0)
    assert not on_meta.image_grid_thw.is_meta  # the grids stay on the host


def test_host_checks_keep_their_one_line_errors():
    model = VLModel(tiny_config())
    mb = global_batch(0, 2)[1]  # text-only
    with pytest.raises(ValueError, match=r"input_ids hold 3 <\|image_pad\|> and 0 <\|video_pad\|> tokens but no "
                                         r"pixel_values"):
        model(**{**mb.model_inputs(), "placeholder_counts": (3, 0)})
    labels = mb.labels.clone()
    labels[labels != IGNORE_INDEX] = model.cfg.text.vocab_size  # one past the vocabulary
    with pytest.raises(ValueError, match=rf"labels hold token id {model.cfg.text.vocab_size} outside the "
                                         rf"vocabulary \[0, {model.cfg.text.vocab_size}\)") as e:
        supervised_positions(labels, model.cfg.text.vocab_size)
    assert "\n" not in str(e.value)
