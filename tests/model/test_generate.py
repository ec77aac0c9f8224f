"""Greedy generation with the KV cache (model/generate.py) against transformers' `generate` on a tiny random
checkpoint of every family: the same token ids and the same per-step (raw) logits, for a text prompt, an image
prompt and a video prompt (images and videos through the ViT once, Qwen3-VL's DeepStack included, M-RoPE positions
continued with Qwen's rope delta)."""

from __future__ import annotations

import pytest
import torch

import model.generate as generate_mod
from model.generate import greedy_generate, rope_continuation
from model.hf_adapter import load_hf_model
from model.parity import Sample, SampleBuilder, mm_token_type_ids, sample_positions, video_kwargs
from model.text import KVCache

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def ours(hf_tiny_dir):
    return load_hf_model(hf_tiny_dir).eval()


# Seed of the random prompts per family: random tiny models fall into short cycles for some prompts, which would make
# the "not a degenerate continuation" check below vacuous; these seeds give every case several distinct tokens.
PROMPT_SEED = {"qwen2_vl": 0, "qwen2_5_vl": 4, "qwen3_vl": 0}


def prompts(cfg) -> dict[str, Sample]:
    b = SampleBuilder(cfg, torch.Generator().manual_seed(PROMPT_SEED[cfg.family]))
    return {
        "text": b.sample(17),
        "image": b.sample(5, ("image", (1, 8, 12)), 6),
        # (2, 4, 6): 2 frame pairs on a 2x3 merged grid. Here transformers 5.x's own rope index (which
        # `generate` uses) agrees with the reference algorithm; with more frame pairs than max(h, w)/2 they
        # differ (docs/model.md), and the prompt positions would then not be comparable.
        "video": b.sample(4, ("video", (2, 4, 6)), 5),
    }


def hf_inputs(hf, s: Sample, cfg) -> dict:
    """transformers' generate() inputs for one prompt (the family's video timing included); clears the model's
    rope state from an earlier call."""
    ids = s.input_ids
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
              "mm_token_type_ids": mm_token_type_ids(ids, cfg)[None]}
    if s.pixel_values is not None:
        inputs.update(pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw)
    if s.pixel_values_videos is not None:
        inputs.update(pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw,
                      **video_kwargs(s, cfg, "cpu"))
    hf.model.rope_deltas = None  # no state from an earlier call
    return inputs


def hf_generate(hf, s: Sample, cfg, **kw):
    out = hf.generate(**hf_inputs(hf, s, cfg), do_sample=False, output_logits=True, return_dict_in_generate=True,
                      **kw)
    return out.sequences[0, s.input_ids.numel():].tolist(), [lg[0].float() for lg in out.logits]


def ours_generate(model, s: Sample, **kw):
    return greedy_generate(model, s.input_ids, pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                           pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw,
                           video_seconds_per_pair=s.video_seconds, **kw)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("case", ["text", "image", "video"])
def test_greedy_equals_transformers_generate(hf_tiny, ours, case, monkeypatch):
    cfg = ours.cfg
    s = prompts(cfg)[case]
    theirs, their_scores = hf_generate(hf_tiny, s, cfg, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    mine = ours_generate(ours, s, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert len(theirs) == NEW_TOKENS
    assert mine.tokens == theirs
    assert not mine.finished
    assert max_diff(mine.logits, their_scores) < 1e-5
    assert len(set(mine.tokens)) > 2  # not a degenerate constant continuation

    pos = sample_positions(s, cfg)
    if case == "text":
        assert rope_continuation(pos) == s.input_ids.numel()  # text only: no rope delta
        return
    # After a vision block the highest position is below the token count: the rope delta matters, and
    # continuing at the token count instead moves the logits far beyond the tolerance above.
    assert rope_continuation(pos) < s.input_ids.numel()
    monkeypatch.setattr(generate_mod, "rope_continuation", lambda p: p.shape[1])
    wrong = ours_generate(ours, s, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert max_diff(wrong.logits, their_scores) > 1e-3


def test_vision_runs_once(ours, monkeypatch):
    s = prompts(ours.cfg)["image"]
    calls = []
    orig = ours.visual.forward
    monkeypatch.setattr(ours.visual, "forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    ours_generate(ours, s, max_new_tokens=5)
    assert len(calls) == 1


def test_stops_at_eos_like_transformers(hf_tiny, ours):
    cfg = ours.cfg
    s = prompts(cfg)["image"]
    free = ours_generate(ours, s, max_new_tokens=NEW_TOKENS).tokens
    eos = free[3]
    stop = free.index(eos) + 1  # the first occurrence ends it, inclusive
    theirs, _ = hf_generate(hf_tiny, s, cfg, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    mine = ours_generate(ours, s, max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,))
    assert mine.finished and mine.tokens == free[:stop] == theirs[:stop]


def test_cached_logits_equal_a_full_forward(ours):
    """Every decoding step's logits equal a plain (uncached) forward over prompt + tokens so far."""
    cfg = ours.cfg
    s = prompts(cfg)["video"]
    gen = ours_generate(ours, s, max_new_tokens=6, return_logits=True)
    pos = sample_positions(s, cfg)
    start = rope_continuation(pos)
    for j in range(1, len(gen.tokens)):
        ids = torch.cat([s.input_ids, torch.tensor(gen.tokens[:j])])
        full_pos = torch.cat([pos, torch.arange(start, start + j).expand(3, -1)], dim=1)
        with torch.no_grad():
            h = ours(input_ids=ids, position_ids=full_pos, pixel_values_videos=s.pixel_values_videos,
                     video_grid_thw=s.video_grid_thw)
            ref = ours.logits(h[-1]).float()
        assert float((gen.logits[j] - ref).abs().max()) < 1e-5


def test_bad_use_is_a_clear_error(ours):
    s = prompts(ours.cfg)["text"]
    cache = KVCache(4)
    with pytest.raises(ValueError, match="do not fit"):
        ours(input_ids=s.input_ids, kv_cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_generate(ours, s.input_ids, max_new_tokens=0)
    head, ours.lm_head = ours.lm_head, None
    try:
        with pytest.raises(ValueError, match="whole model"):
            greedy_generate(ours, s.input_ids, max_new_tokens=2)
    finally:
        ours.lm_head = head
