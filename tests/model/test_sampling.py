"""Sampled generation (model/generate.py: temperature, top-p, a seed, streaming) against transformers' `generate`
with do_sample=True on a tiny random checkpoint: under the same torch seed both draw the same tokens (the same
logits processors in the same order, then one torch.multinomial draw per token)."""

from __future__ import annotations

import pytest
import torch
from test_generate import hf_inputs, ours_generate, prompts

from model.generate import Sampling, choose, generate
from model.parity import Sample

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def ours(hf_tiny_dir):
    from model.hf_adapter import load_hf_model

    return load_hf_model(hf_tiny_dir).eval()


def hf_sample(hf, s: Sample, cfg, **kw) -> list[int]:
    out = hf.generate(**hf_inputs(hf, s, cfg), do_sample=True, top_k=0, max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, **kw)
    return out[0, s.input_ids.numel():].tolist()


@pytest.mark.parametrize("case,temperature,top_p", [("text", 0.7, 0.9), ("image", 1.3, 0.5), ("video", 1.0, 1.0)])
def test_sampling_equals_transformers(hf_tiny, ours, case, temperature, top_p):
    cfg = ours.cfg
    s = prompts(cfg)[case]
    torch.manual_seed(11)
    theirs = hf_sample(hf_tiny, s, cfg, temperature=temperature, top_p=top_p)
    torch.manual_seed(11)
    mine = ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(temperature, top_p))
    assert mine.tokens == theirs
    greedy = ours_generate(ours, s, max_new_tokens=NEW_TOKENS).tokens
    assert mine.tokens != greedy  # a random model's logits are flat: sampling really drew


def test_seed_streaming_and_limits(ours):
    s = prompts(ours.cfg)["image"]
    streamed: list[int] = []
    a = ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(1.0, 0.95, seed=3),
                      on_token=streamed.append)
    assert streamed == a.tokens  # each token handed out as it was chosen
    assert ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(1.0, 0.95, seed=3)).tokens == a.tokens
    assert ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(1.0, 0.95, seed=4)).tokens != a.tokens
    greedy = ours_generate(ours, s, max_new_tokens=NEW_TOKENS).tokens
    # temperature 0, or a nucleus of one token, is the argmax
    assert ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(0.0, seed=3)).tokens == greedy
    assert ours_generate(ours, s, max_new_tokens=NEW_TOKENS, sampling=Sampling(1.0, 1e-6, seed=3)).tokens == greedy
    assert generate(ours, s.input_ids, max_new_tokens=3, pixel_values=s.pixel_values,
                    image_grid_thw=s.image_grid_thw).tokens == greedy[:3]
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    drawn = {choose(logits, Sampling(1.0, 0.8), torch.Generator().manual_seed(i)) for i in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn
    drawn = {choose(logits, Sampling(1.0, 0.81), torch.Generator().manual_seed(i)) for i in range(200)}
    assert drawn == {0, 1, 2}
