"""Tiny model configs (every family) and synthetic packed microbatches (images, videos, text-only) for the parallel
tests.

Every microbatch is built like the loader builds one: whole samples back to back, vision blocks of
grid_t*grid_h*grid_w/4 pad tokens between <|vision_start|>/<|vision_end|> (Qwen3-VL videos: one block per frame
pair behind a text timestamp), pixel rows in placeholder order, M-RoPE positions from the family's processing
facts (Qwen's reference algorithm), labels shifted with -100 on vision tokens, prompts and each sample's last
position.
"""

from __future__ import annotations

import dataclasses

import torch

from core.batch import PackedBatch
from model.config import ModelConfig, TextConfig, VisionConfig
from model.family import get_family
from model.loss import model_loss

IMG, VID, VSTART, VEND = 500, 501, 502, 503
TEXT_VOCAB = 490  # text ids stay below the special ids


def tiny_config(tie: bool = False, layers: int = 4, hidden: int = 64, vocab: int = 512,
                family: str = "qwen2_vl") -> ModelConfig:
    """A tiny model of `family` (small vocab so CPU tests are fast); tp=2 divides every head count and width.
    Qwen2.5-VL: 28-pixel windows (every merged token its own window) with block 1 of 2 attending over whole frames;
    Qwen3-VL: DeepStack after ViT blocks 0 and 2 (decoder layers 0 and 1 must then sit in pipeline stage 0), a 4x4
    position table, head_dim 24 (not hidden / heads), interleaved M-RoPE, one more decoder layer."""
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=4, num_kv_heads=2, mrope_section=(hidden // 32, 3 * hidden // 64, 3 * hidden // 64)
        if hidden != 64 else (2, 3, 3), tie_word_embeddings=tie,
    )
    vision = VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
    if family == "qwen2_5_vl":
        vision = VisionConfig(depth=2, embed_dim=32, num_heads=4, intermediate_size=44, hidden_act="silu",
                              window_size=28, fullatt_block_indexes=(1,), tokens_per_second=2.0)
    elif family == "qwen3_vl":
        vision = VisionConfig(depth=3, embed_dim=32, num_heads=4, intermediate_size=44,
                              hidden_act="gelu_pytorch_tanh", patch_size=16, num_position_embeddings=16,
                              deepstack_visual_indexes=(0, 2))
        text = dataclasses.replace(text, num_layers=layers + 1, head_dim_override=24, mrope_section=(4, 4, 4),
                                   mrope_interleaved=True, qkv_bias=False, qk_norm=True)
    return ModelConfig(
        family=family, vision=vision, text=text,
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        attn_backend="sdpa",
    )


def _proc(family: str):
    return get_family(family).processing(tiny_config(family=family))


def _vision_block(g: torch.Generator, kind: str, grid: tuple[int, int, int], family: str) -> torch.Tensor:
    t, h, w = grid
    pad = IMG if kind == "image" else VID
    if kind == "video" and _proc(family).video_time == "timestamps":
        frames = [torch.cat([torch.randint(0, TEXT_VOCAB, (2,), generator=g), torch.tensor([VSTART]),
                             torch.full((h * w // 4,), pad), torch.tensor([VEND])]) for _ in range(t)]
        return torch.cat([torch.tensor([VSTART]), *frames, torch.tensor([VEND])])
    return torch.cat([torch.tensor([VSTART]), torch.full((t * h * w // 4,), pad), torch.tensor([VEND])])


def _sample(g: torch.Generator, kind: str, text_len: int, grid: tuple[int, int, int] | None, family: str):
    """One sample: (ids, labels, pixel rows, grid, kind)."""
    prompt = torch.randint(0, TEXT_VOCAB, (text_len // 2,), generator=g)
    answer = torch.randint(0, TEXT_VOCAB, (text_len - text_len // 2,), generator=g)
    parts, sup = [prompt], [torch.zeros(prompt.numel(), dtype=torch.bool)]
    pixels = None
    if grid is not None:
        t, h, w = grid
        block = _vision_block(g, kind, grid, family)
        parts.append(block)
        sup.append(torch.zeros(block.numel(), dtype=torch.bool))
        pixels = torch.randn(t * h * w, _proc(family).patch_dim, generator=g)
    parts.append(answer)
    sup.append(torch.ones(answer.numel(), dtype=torch.bool))
    ids = torch.cat(parts)
    is_sup = torch.cat(sup)
    # Shifted labels: position t predicts ids[t+1] where that token is supervised; the last position has none.
    labels = torch.full_like(ids, -100)
    labels[:-1] = torch.where(is_sup[1:], ids[1:], torch.full_like(ids[1:], -100))
    return ids, labels, pixels, grid, kind


def pack(samples, family: str = "qwen2_vl") -> PackedBatch:
    proc = _proc(family)
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    lens = torch.tensor([s[0].numel() for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)])
    img = [s for s in samples if s[4] == "image"]
    vid = [s for s in samples if s[4] == "video"]
    image_grid = torch.tensor([s[3] for s in img], dtype=torch.long).reshape(-1, 3)
    video_grid = torch.tensor([s[3] for s in vid], dtype=torch.long).reshape(-1, 3)
    # Qwen2.5-VL's video time: one frame pair a second (2 temporal ids per pair at 2 tokens per second).
    pos = proc.packed_position_ids(ids, cu, image_grid, video_grid, [1.0] * len(vid) if vid else None)
    mb = PackedBatch(
        input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=cu, max_seqlen=int(lens.max()),
        pixel_values=torch.cat([s[2] for s in img]) if img else torch.zeros(0, proc.patch_dim),
        image_grid_thw=image_grid,
        pixel_values_videos=torch.cat([s[2] for s in vid]) if vid else torch.zeros(0, proc.patch_dim),
        video_grid_thw=video_grid, sample_keys=[f"synthetic/{i}" for i in range(len(samples))],
    )
    mb.validate()
    return mb


# Microbatch recipes, cycled: image + text, text-only, video + text, two images, text-only (odd lengths).
_RECIPES = [
    [("image", (1, 4, 4)), ("text", None)],
    [("text", None), ("text", None)],
    [("video", (2, 4, 4)), ("text", None)],
    [("image", (1, 2, 4)), ("image", (1, 4, 2))],
    [("text", None)],
]


def global_batch(step: int, n: int, seed: int = 1234, family: str = "qwen2_vl") -> list[PackedBatch]:
    """n microbatches of distinct lengths for optimizer step `step` (lengths change from step to step)."""
    g = torch.Generator().manual_seed(seed + 7919 * step)
    out: list[PackedBatch] = []
    for i in range(n):
        recipe = _RECIPES[(i + step) % len(_RECIPES)]
        base = [5 + 3 * i + 2 * j + step + int(torch.randint(0, 4, (1,), generator=g)) for j in range(len(recipe))]
        extra = 0
        while True:  # lengths must be distinct within the step: grow the last text until they are
            state = g.get_state()
            samples = [_sample(g, kind, base[j] + (extra if j == len(recipe) - 1 else 0), grid, family)
                       for j, (kind, grid) in enumerate(recipe)]
            mb = pack(samples, family)
            if mb.num_tokens not in {x.num_tokens for x in out}:
                break
            g.set_state(state)
            extra += 1
        out.append(mb)
    return out


def reference_step(model: torch.nn.Module, mbs: list[PackedBatch]) -> float:
    """One process, no parallel code: sum of token CE over all microbatches / global supervised count."""
    total = sum(mb.num_supervised for mb in mbs)
    loss_total = 0.0
    for mb in mbs:
        loss_sum, _ = model_loss(model, mb.labels, **mb.model_inputs())
        (loss_sum / total).backward()
        loss_total += float(loss_sum)
    return loss_total / total
