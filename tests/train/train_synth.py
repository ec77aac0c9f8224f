"""Synthetic PackedBatch microbatches for unit tests of the optimizer/engine glue (no loader, no files).

Each microbatch packs 1-3 samples; some carry one image (a vision block of grid (1, 4, 4) = 4 merged pads)
so the ViT path and the scatter of vision embeddings run. Labels are shifted ids of the text tokens; vision
tokens are never supervised; position ids come from the family's reference M-RoPE algorithm (images only, so
every family lays the tokens out alike; pixel rows are as wide as the family's patches).
"""

from __future__ import annotations

import torch

from core.batch import PackedBatch
from model.config import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from model.family import get_family, get_preset


def make_batch(gen: torch.Generator, max_tokens: int = 64, family: str = "qwen2_vl") -> PackedBatch:
    proc = get_family(family).processing(get_preset(family, "tiny"))
    ids, labels, cu, grids, pix = [], [], [0], [], []
    n_samples = int(torch.randint(1, 4, (1,), generator=gen))
    for _ in range(n_samples):
        n_text = int(torch.randint(4, max(5, max_tokens // n_samples - 8), (1,), generator=gen))
        text = torch.randint(10, 5000, (n_text,), generator=gen)
        if bool(torch.rand(1, generator=gen) < 0.5):
            sample = torch.cat([torch.tensor([VISION_START_ID]), torch.full((4,), IMAGE_PAD_ID),
                                torch.tensor([VISION_END_ID]), text])
            grids.append([1, 4, 4])
            pix.append(torch.randn(16, proc.patch_dim, generator=gen))
        else:
            sample = text
        lab = torch.full_like(sample, -100)
        supervised = sample != IMAGE_PAD_ID
        supervised &= sample != VISION_START_ID
        supervised &= sample != VISION_END_ID
        nxt = sample[1:]
        lab[:-1] = torch.where(supervised[1:], nxt, torch.full_like(nxt, -100))
        ids.append(sample)
        labels.append(lab)
        cu.append(cu[-1] + sample.numel())
    input_ids = torch.cat(ids)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    pos = proc.packed_position_ids(input_ids, cu_seqlens, grid if grids else None)
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    return PackedBatch(
        input_ids=input_ids,
        labels=torch.cat(labels),
        position_ids=pos,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lens.max()),
        pixel_values=torch.cat(pix) if pix else torch.zeros(0, proc.patch_dim),
        image_grid_thw=grid,
        sample_keys=[f"synthetic/{i}" for i in range(n_samples)],
    )
