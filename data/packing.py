"""Best-fit packing of processed samples into microbatches under an LLM-token and a ViT-patch budget.

Shape legend: T = packed tokens, S = samples in the microbatch, N = patch rows, P = 3 * 2 * p * p at the family's
patch size p (its samples carry it).

The packer holds a buffer of samples (bounded by count and by patch rows). When it is full, one microbatch is
formed: the OLDEST sample opens it (so no sample waits forever), then the largest buffered sample that still
fits both remaining budgets is added, again and again, until nothing fits (best fit: each choice leaves the
least room). Samples never share attention (cu_seqlens), positions restart per sample. A sample over the budgets
but within the larger ones of video samples (data.max_video_sample_tokens / _patches) fits no open microbatch:
it opens one when it is the oldest, and travels alone.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

from core.batch import PackedBatch
from data.media.vision import image_rows_raw, vision_or_default
from data.sample import Processed
from model.processing import VisionProcessing


@dataclass
class Entry:
    ref: tuple  # the sample reference the loader state stores (dataset, epoch, position)
    sample: Processed
    tokens: int = field(init=False)
    patches: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.sample.num_tokens
        self.patches = self.sample.num_patches


class Packer:
    """Best-fit over a buffer; `max_tokens` / `max_patches` are hard limits of every microbatch of several samples,
    `solo_tokens` / `solo_patches` (default: the same) of a microbatch holding one sample."""

    def __init__(self, max_tokens: int, max_patches: int, buffer_size: int, buffer_patches: int,
                 solo_tokens: int | None = None, solo_patches: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.max_patches = max_patches
        self.solo_tokens = max(max_tokens, solo_tokens or 0)
        self.solo_patches = max(max_patches, solo_patches or 0)
        self.buffer_size = buffer_size
        self.buffer_patches = buffer_patches
        self.entries: list[Entry] = []
        self._patches = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry) -> None:
        if entry.tokens > self.solo_tokens or entry.patches > self.solo_patches:
            raise ValueError(f"sample {entry.sample.key} ({entry.tokens} tokens, {entry.patches} patches) exceeds "
                             f"the budget ({self.solo_tokens}, {self.solo_patches}); it should have been skipped")
        self.entries.append(entry)
        self._patches += entry.patches

    def full(self) -> bool:
        return len(self.entries) >= self.buffer_size or self._patches >= self.buffer_patches

    def pop_bin(self) -> list[Entry]:
        """Remove and return the samples of the next microbatch (in buffer order)."""
        if not self.entries:
            return []
        tok = np.fromiter((e.tokens for e in self.entries), dtype=np.int64, count=len(self.entries))
        pat = np.fromiter((e.patches for e in self.entries), dtype=np.int64, count=len(self.entries))
        free = np.ones(len(self.entries), dtype=bool)
        free[0] = False
        chosen = [0]
        # An oversized opener (a long video sample) leaves negative room: nothing joins it.
        rem_t, rem_p = self.max_tokens - int(tok[0]), self.max_patches - int(pat[0])
        while True:
            ok = free & (tok <= rem_t) & (pat <= rem_p)
            if not ok.any():
                break
            j = int(np.argmax(np.where(ok, tok, -1)))  # largest that fits; ties -> oldest
            chosen.append(j)
            free[j] = False
            rem_t -= int(tok[j])
            rem_p -= int(pat[j])
        chosen.sort()
        picked = [self.entries[j] for j in chosen]
        keep = set(chosen)
        self.entries = [e for j, e in enumerate(self.entries) if j not in keep]
        self._patches -= sum(e.patches for e in picked)
        return picked


def assemble(samples: list[Processed]) -> PackedBatch:
    """Concatenate whole samples into one PackedBatch (images/videos in placeholder order; pixel rows as wide as
    the family's patches: 3 * p * p per raw image row, 3 * T * p * p per video row, empty ones too)."""
    vision = vision_or_default(samples[0].vision)
    if any(vision_or_default(s.vision) != vision for s in samples):
        raise ValueError("samples made with different processor facts (model families) cannot share a microbatch")
    p = vision.patch_size
    video_dim = 3 * vision.temporal_patch_size * p * p
    lens = [s.num_tokens for s in samples]
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    vid_rows = [r for s in samples for r in s.video_rows]
    img_grids = [g for s in samples for g in s.image_grids]
    vid_grids = [g for s in samples for g in s.video_grids]
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        position_ids=torch.cat([s.position_ids for s in samples], dim=1),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        pixel_values=_image_rows(samples, img_grids, vision),
        image_grid_thw=torch.tensor(img_grids, dtype=torch.long).reshape(-1, 3),
        pixel_values_videos=torch.cat(vid_rows, out=_empty(sum(r.shape[0] for r in vid_rows), video_dim,
                                                            vid_rows[0].dtype))
        if vid_rows else _empty(0, video_dim),
        video_grid_thw=torch.tensor(vid_grids, dtype=torch.long).reshape(-1, 3),
        sample_keys=[s.key for s in samples],
    )


_HUGE = 2 << 20
_libc = None


def _advise_huge(t: torch.Tensor) -> torch.Tensor:
    """Ask for transparent huge pages on a large fresh buffer (Linux, THP 'madvise' mode).

    NOTE: a microbatch's pixel buffer is tens of MB of never-touched memory; faulting it in 4 KB pages costs
    about as much CPU as normalizing the pixels (measured 3x less with 2 MB pages). Best effort: any failure
    leaves ordinary pages.
    """
    global _libc
    nbytes = t.numel() * t.element_size()
    if nbytes < 4 * _HUGE or not sys.platform.startswith("linux"):
        return t
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
        _libc.madvise(start, end - start, 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass
    return t


def _empty(n: int, width: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialized (n, width) buffer for pixel rows (raw uint8 from our loader); in a DataLoader worker,
    allocated in shared memory right away.

    NOTE: otherwise torch copies every tensor of a worker's result into fresh shared memory when it is queued
    to the main process; pixel rows are most of a microbatch's bytes, so writing them into shared memory
    directly saves that copy (what torch's default_collate does for the same reason). Rows are RAW uint8
    (core/batch.py): a quarter of float32's bytes for videos, an eighth for images (one frame per row).
    """
    if n == 0 or get_worker_info() is None:
        return _advise_huge(torch.empty(n, width, dtype=dtype))
    storage = torch.UntypedStorage._new_shared(n * width * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (n, width), (width, 1))


def _image_rows(samples: list[Processed], grids: list[tuple[int, int, int]],
                vision: VisionProcessing) -> torch.Tensor:
    """All images' raw pixel rows (N, 3 * p * p) uint8, written straight into one buffer (no per-image tensors to
    concatenate)."""
    n = sum(t * h * w for t, h, w in grids)
    out_NP = _empty(n, 3 * vision.patch_size * vision.patch_size)
    o = 0
    for s in samples:
        for im, (t, h, w) in zip(s.images, s.image_grids):
            image_rows_raw(im, vision, out=out_NP[o : o + t * h * w].numpy())
            o += t * h * w
    return out_NP


def simulate(lengths: list[tuple[int, int]], max_tokens: int, max_patches: int, buffer_size: int) -> dict:
    """Pack (tokens, patches) pairs as the loader would; returns efficiency figures (tests, benchmarks)."""
    class _S:  # a stand-in with only the sizes
        def __init__(self, t: int, p: int) -> None:
            self.num_tokens, self.num_patches, self.key = t, p, ""

    pk = Packer(max_tokens, max_patches, buffer_size, 1 << 62)
    bins: list[int] = []
    patches: list[int] = []
    for t, p in lengths:
        pk.add(Entry((), _S(t, p)))  # type: ignore[arg-type]
        if pk.full():
            b = pk.pop_bin()
            bins.append(sum(e.tokens for e in b))
            patches.append(sum(e.patches for e in b))
    while len(pk):
        b = pk.pop_bin()
        bins.append(sum(e.tokens for e in b))
        patches.append(sum(e.patches for e in b))
    return {
        "microbatches": len(bins),
        "efficiency": sum(bins) / (len(bins) * max_tokens),
        "patch_utilization": sum(patches) / (len(bins) * max_patches),
        "min_fill": min(bins) / max_tokens,
    }
