"""Loss and parameter-gradient parity with transformers on the same batch, for every family.

transformers takes UNSHIFTED labels (it shifts inside its loss) and averages over supervised tokens; ours
takes labels already shifted (labels[t] = the token predicted at t, -100 at each sample's last position)
and returns (sum, count). Gradients are compared key by key after mapping ours to the HF layout with the
project's own adapter (q/k/v fused back into qkv).
"""

from __future__ import annotations

import torch

from core.batch import IGNORE_INDEX
from model.hf_adapter import normalize_hf_key, to_hf_state_dict
from model.loss import model_loss
from model.parity import Sample, SampleBuilder, mm_token_type_ids, sample_positions, video_kwargs
from model.vlm import VLModel


def _hf_labels(s: Sample, cfg, gen) -> torch.Tensor:
    """Unshifted labels: random half of the text tokens supervised; vision tokens never."""
    ids = s.input_ids
    lab = ids.clone()
    vision = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    lab[vision | (torch.rand(ids.shape, generator=gen) < 0.5)] = IGNORE_INDEX
    return lab


def _shift(hf_labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([hf_labels[1:], torch.tensor([IGNORE_INDEX])])


def _hf_grads(hf) -> dict[str, torch.Tensor]:
    return {normalize_hf_key(k): p.grad for k, p in hf.named_parameters() if p.grad is not None}


def _our_grads(ours: VLModel) -> dict[str, torch.Tensor]:
    g = {k: p.grad for k, p in ours.named_parameters()}
    return to_hf_state_dict(g, ours.cfg.text.tie_word_embeddings)


def _compare(hf_g: dict, our_g: dict) -> None:
    assert hf_g.keys() == our_g.keys(), sorted(hf_g.keys() ^ our_g.keys())
    for k in hf_g:
        a, b = hf_g[k], our_g[k]
        scale = a.abs().max().item()
        assert scale > 0 or "visual" in k, f"{k}: zero reference gradient, the test would be vacuous"
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 + 1e-4 * scale, msg=lambda m, k=k: f"{k}: {m}")


def _load_ours(hf, family: str) -> VLModel:
    from model.hf_adapter import from_hf_state_dict
    from tests.model.conftest import small_cfg

    ours = VLModel(small_cfg(family))
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), False), strict=True)
    return ours


def test_loss_and_grads_match_transformers_single_sample(hf_tiny, family):
    hf = hf_tiny
    ours = _load_ours(hf, family)
    cfg = ours.cfg
    gen = torch.Generator().manual_seed(5)
    s = SampleBuilder(cfg, gen).sample(6, ("image", (1, 4, 6)), 5, ("video", (3, 4, 4)), 9)
    lab = _hf_labels(s, cfg, gen)
    pos = sample_positions(s, cfg)

    hf.zero_grad(set_to_none=True)
    hf.model.rope_deltas = None
    out = hf(input_ids=s.input_ids[None], labels=lab[None], position_ids=pos[:, None, :],
             mm_token_type_ids=mm_token_type_ids(s.input_ids, cfg)[None], pixel_values=s.pixel_values,
             image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
             video_grid_thw=s.video_grid_thw, use_cache=False, **video_kwargs(s, cfg, "cpu"))
    out.loss.backward()

    loss_sum, n = model_loss(ours, _shift(lab), input_ids=s.input_ids, position_ids=pos, pixel_values=s.pixel_values,
                             image_grid_thw=s.image_grid_thw, pixel_values_videos=s.pixel_values_videos,
                             video_grid_thw=s.video_grid_thw)
    assert int(n) == int((lab[1:] != IGNORE_INDEX).sum()) > 0
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, out.loss.float(), rtol=1e-5, atol=1e-6)
    _compare(_hf_grads(hf), _our_grads(ours))


def test_packed_grads_match_transformers_padded_batch(hf_tiny, family):
    """Ours: 3 samples packed with cu_seqlens. transformers: the same 3 as a right-padded batch with an
    attention mask. Same mean loss over all supervised tokens, same gradients."""
    hf = hf_tiny
    ours = _load_ours(hf, family)
    cfg = ours.cfg
    gen = torch.Generator().manual_seed(7)
    b = SampleBuilder(cfg, gen)
    samples = [b.sample(4, ("image", (1, 4, 4)), 13), b.sample(21), b.sample(3, ("video", (2, 4, 6)), 6)]
    labels = [_hf_labels(s, cfg, gen) for s in samples]
    L = max(s.input_ids.numel() for s in samples)
    B = len(samples)
    ids = torch.zeros(B, L, dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX)
    mask = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(3, B, L, dtype=torch.long)
    for i, (s, y) in enumerate(zip(samples, labels)):
        n = s.input_ids.numel()
        ids[i, :n], lab[i, :n], mask[i, :n], pos[:, i, :n] = s.input_ids, y, 1, sample_positions(s, cfg)
    pv = torch.cat([s.pixel_values for s in samples if s.pixel_values is not None])
    pvv = torch.cat([s.pixel_values_videos for s in samples if s.pixel_values_videos is not None])
    g_img = torch.cat([s.image_grid_thw for s in samples if s.image_grid_thw is not None])
    g_vid = torch.cat([s.video_grid_thw for s in samples if s.video_grid_thw is not None])

    hf.zero_grad(set_to_none=True)
    hf.model.rope_deltas = None
    out = hf(input_ids=ids, attention_mask=mask, labels=lab, position_ids=pos,
             mm_token_type_ids=mm_token_type_ids(ids, cfg), pixel_values=pv, image_grid_thw=g_img,
             pixel_values_videos=pvv, video_grid_thw=g_vid, use_cache=False)
    out.loss.backward()

    p_ids = torch.cat([s.input_ids for s in samples])
    lengths = [s.input_ids.numel() for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seconds = [x for s in samples for x in (s.video_seconds or [])]
    p_pos = ours.processing.packed_position_ids(p_ids, cu, g_img, g_vid, seconds)
    p_lab = torch.cat([_shift(y) for y in labels])
    loss_sum, n = model_loss(ours, p_lab, input_ids=p_ids, position_ids=p_pos, cu_seqlens=cu, max_seqlen=L,
                             pixel_values=pv, image_grid_thw=g_img, pixel_values_videos=pvv, video_grid_thw=g_vid)
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, out.loss.float(), rtol=1e-5, atol=1e-6)
    _compare(_hf_grads(hf), _our_grads(ours))
