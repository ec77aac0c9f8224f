"""A realistic (tokens, patches) length mix for packing figures, built from stated assumptions (not tuned).

Image token counts come from smart_resize on typical image sizes at a common recipe setting
(max_pixels = 1280 * 28 * 28, as Qwen2-VL's processor default); text lengths are log-normal.

    40%  single-image instruction chat (LLaVA-Instruct-like): a COCO-size photo, 1-5 turns, answers ~120 tokens
    25%  text-only SFT: log-normal, median 400 tokens, clipped to [20, 6000]
    20%  captions (stage 1-2): one image 224..1024 px, 10-60 caption tokens
    10%  documents / OCR: a 1000-2000 px page, 200-1500 text tokens
     5%  multi-image: 2-4 photos, 50-400 text tokens
"""

from __future__ import annotations

import numpy as np

from data.media.vision import smart_resize

MAX_PIXELS = 1280 * 28 * 28
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (612, 612), (640, 360)]
TEMPLATE_TOKENS = 20  # system turn + role headers


def image_tokens(w: int, h: int) -> tuple[int, int]:
    """(LLM tokens incl. vision start/end, ViT patches) of one image."""
    rh, rw = smart_resize(h, w, max_pixels=MAX_PIXELS)
    patches = (rh // 14) * (rw // 14)
    return patches // 4 + 2, patches


def length_mix(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    kinds = rng.choice(5, size=n, p=[0.40, 0.25, 0.20, 0.10, 0.05])
    for k in kinds:
        if k == 0:
            t, p = image_tokens(*COCO_SIZES[rng.integers(len(COCO_SIZES))])
            turns = int(rng.integers(1, 6))
            text = sum(int(rng.lognormal(np.log(20), 0.6)) + int(rng.lognormal(np.log(120), 0.9)) for _ in range(turns))
            out.append((t + text + TEMPLATE_TOKENS * turns, p))
        elif k == 1:
            out.append((int(np.clip(rng.lognormal(np.log(400), 1.0), 20, 6000)) + TEMPLATE_TOKENS, 0))
        elif k == 2:
            side = int(rng.integers(224, 1025))
            t, p = image_tokens(side, int(side * rng.uniform(0.6, 1.4)))
            out.append((t + int(rng.integers(10, 61)) + 1, p))
        elif k == 3:
            w = int(rng.integers(1000, 2001))
            t, p = image_tokens(w, int(w * 1.4))
            out.append((t + int(rng.integers(200, 1501)) + TEMPLATE_TOKENS, p))
        else:
            t = p = 0
            for _ in range(int(rng.integers(2, 5))):
                ti, pi = image_tokens(*COCO_SIZES[rng.integers(len(COCO_SIZES))])
                t, p = t + ti, p + pi
            out.append((t + int(rng.integers(50, 401)) + TEMPLATE_TOKENS, p))
    return out
