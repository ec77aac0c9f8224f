"""Decoding with a KV cache in our own model, greedy or sampled: one sequence at a time, on one device.

    from model.generate import Sampling, generate, greedy_generate
    out = greedy_generate(model, input_ids, pixel_values=..., image_grid_thw=..., max_new_tokens=32)
    out.tokens        # generated ids (the EOS that ended it included), out.finished: an EOS ended it
    out = generate(model, input_ids, max_new_tokens=64, sampling=Sampling(temperature=0.7, top_p=0.9, seed=0),
                   on_token=print)   # sampled, each token handed to on_token as it is chosen (streaming)

Sampling (transformers' steps and order): logits / temperature, then top-p (the most likely tokens whose total
probability reaches top_p; the most likely one always stays), then one torch.multinomial draw, from a
torch.Generator seeded by `seed` (a seed repeats its answer) or torch's default generator. temperature 0 is greedy.

Shape legend: L = prompt tokens, T = tokens of one forward (L at prefill, 1 when decoding), D = width, V = vocab.

How it runs:
1. prefill: the prompt's embeddings, with images and videos through the ViT ONCE (VLModel scatters them into the
   pad positions, and adds Qwen3-VL's DeepStack features), go through the decoder with an empty KVCache (the
   training attention kernel, so the prompt's logits equal a plain forward); the last position's logits give the
   first token;
2. decode: each new token's embedding alone, against the cache (model.text.cached_attention).

Positions (M-RoPE): the prompt gets Qwen's reference ids (3, L) of its family (model/processing.py); generated token j
(0-based) gets the same id on all three streams, max(prompt ids) + 1 + j. That is transformers' rope-delta rule
(Qwen2VLModel.get_rope_index returns `rope_deltas` = max + 1 - L; decoding then uses (L + j) + rope_deltas):
text continues right after the highest position of the prompt, which after a vision block is less than the
token count. tests/model/test_generate.py checks the ids against transformers' `generate` token for token.

The model must be whole (no pipeline split) and plain (no tensor-parallel shards): train/eval.py gathers one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.config import IM_END_ID
from model.text import KVCache
from model.vlm import VLModel


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 = greedy (argmax); otherwise a draw after temperature and top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the draws (None: torch's default generator)."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def choose(logits_V: torch.Tensor, sampling: Sampling | None, generator: torch.Generator | None = None) -> int:
    """The next token from fp32 logits (V,): argmax, or one draw from softmax(logits / temperature) over the top-p
    nucleus (the steps of transformers' TemperatureLogitsWarper, TopPLogitsWarper and sampling, in its order)."""
    if sampling is None or sampling.temperature == 0:
        return int(logits_V.argmax())
    scores_V = logits_V / sampling.temperature
    if sampling.top_p < 1:
        sorted_V, idx = torch.sort(scores_V, descending=False)
        # Ascending: drop the least likely tokens while their total stays <= 1 - top_p; the best one always stays.
        drop = sorted_V.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[-1] = False
        scores_V = scores_V.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return int(torch.multinomial(scores_V.softmax(dim=-1), 1, generator=generator))


@dataclass
class Generation:
    """What greedy_generate produced for one prompt."""

    tokens: list[int]
    """Generated token ids, in order; the EOS that ended generation is included."""
    finished: bool
    """An EOS ended generation (False: max_new_tokens did)."""
    logits: list[torch.Tensor] | None = None
    """With return_logits: the (V,) fp32 logits each token was chosen from (transformers' `scores`)."""


def rope_continuation(pos_3L: torch.Tensor) -> int:
    """The M-RoPE id of the first generated token: one past the prompt's highest id on any stream."""
    return int(pos_3L.max()) + 1


def prompt_positions(model: VLModel, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None,
                     video_seconds_per_pair: Sequence[float] | None = None) -> torch.Tensor:
    """M-RoPE ids (3, L) of one prompt under the model's family and special token ids (reference algorithm)."""
    vid = None if video_grid_thw is None or not video_grid_thw.numel() else video_grid_thw.cpu()
    return model.processing.position_ids(
        input_ids.reshape(-1).cpu(),
        None if image_grid_thw is None or not image_grid_thw.numel() else image_grid_thw.cpu(),
        vid, video_seconds_per_pair if vid is not None else None,
    )


def greedy_generate(model: VLModel, input_ids: torch.Tensor, **kw) -> Generation:
    """Greedy (argmax) continuation of ONE prompt: generate() without sampling."""
    return generate(model, input_ids, **kw)


@torch.no_grad()
def generate(
    model: VLModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (IM_END_ID,),
    position_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_seconds_per_pair: Sequence[float] | None = None,
    return_logits: bool = False,
    sampling: Sampling | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Continuation of ONE prompt (input_ids (L,)) for up to max_new_tokens tokens, stopping after the first token
    in eos_token_ids: greedy, or sampled by `sampling`; each token goes to `on_token` as soon as it is chosen.
    position_ids (3, L) default to the reference M-RoPE ids (Qwen2.5-VL videos need video_seconds_per_pair for
    them); pixel rows are raw uint8 or normalized float (core/batch.py)."""
    if model.embed_tokens is None or model.norm is None or model.lm_head is None:
        raise ValueError("generate needs the whole model (embeddings, final norm and head); this is a "
                         "pipeline stage of it")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    device = model.embed_tokens.weight.device
    ids_L = input_ids.reshape(-1).to(device)
    L = ids_L.numel()
    if L == 0:
        raise ValueError("generate got an empty prompt")
    if position_ids is None:
        position_ids = prompt_positions(model, ids_L, image_grid_thw, video_grid_thw, video_seconds_per_pair)
    pos_3L = position_ids.reshape(3, L).to(device)
    next_pos = rope_continuation(pos_3L)
    eos = {int(e) for e in eos_token_ids}

    cache = KVCache(L + max_new_tokens)
    # Prefill: the prompt with its images and videos through the ViT once (DeepStack included).
    h_TD = model(input_ids=ids_L, position_ids=pos_3L, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                 pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, kv_cache=cache)
    tokens: list[int] = []
    scores: list[torch.Tensor] | None = [] if return_logits else None
    gen = None
    if sampling is not None and sampling.seed is not None:
        gen = torch.Generator(device=device).manual_seed(sampling.seed)
    for j in range(max_new_tokens):
        logits_V = model.logits(h_TD[-1]).float()
        if scores is not None:
            scores.append(logits_V)
        tok = choose(logits_V, sampling, gen)
        tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos:
            return Generation(tokens, True, scores)
        if j == max_new_tokens - 1:
            break
        h_TD = model.embed_tokens(torch.tensor([tok], device=device))
        pos_31 = torch.full((3, 1), next_pos + j, dtype=torch.long, device=device)
        h_TD = model(hidden_states=h_TD, position_ids=pos_31, kv_cache=cache)
    return Generation(tokens, False, scores)
