"""What a sample becomes: the data settings that decide the tokens and pixels of a sample, as one small dict.

    fp = sample_fingerprint(cfg, vision)          # stored in every checkpoint's meta.json
    changes = fingerprint_changes(saved, fp)      # ["data.video.fps: 2.0 -> 1.0", ...] in the recipe's keys

A resumed run whose fingerprint differs from its checkpoint's is not the run it claims to continue: the same
samples would become other tokens or pixels. The trainer decides what to do about it (train/resume_data.py);
here is only the what. In it:

- the tokenizer, by the sha256 of its tokenizer.json (a path can move, or hold another tokenizer);
- the model family's processor facts (`vision`, model.processing.VisionProcessing; None = Qwen2-VL's): the
  family, patch / merge / temporal patch sizes (so the resize factor), pixel mean and std, how a video's time is
  encoded (and tokens per second);
- images: `min_pixels`, `max_pixels` in force (null: the family's defaults, recorded as their values);
- videos: the resolved `video.*` settings that change frames, pixels or tokens (fps, frame and pixel bounds, the
  token cap in force, the decoder backend); not timeouts, threads or the cache, which change neither;
- rendering and labels (the chat template's options): the default system prompt in force (`auto`: the family's),
  `supervise`, `pretrain_eos`, and per dataset its `kind`, `supervise` and `append_eod`;
- truncation: `max_tokens` when `overlong: truncate` cuts samples at it.

Budgets that only decide whether a sample fits (max_patches, the video-sample budgets) are not in it (the loader's
own resume check covers them), except through the video token cap they set when `video.max_tokens` is 0.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

from data.config import DataConfig
from data.media.vision import vision_or_default
from model.processing import VisionProcessing

_VIDEO_KEYS = ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "max_tokens", "backend")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_hash(path: str) -> str | None:
    """sha256 of the tokenizer.json a `data.tokenizer` path names (None when there is none: the loader says so)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        st = os.stat(file)
    except OSError:
        return None
    return _file_sha256(os.path.abspath(file), st.st_size, st.st_mtime_ns)


def family_facts(vision: VisionProcessing | None = None) -> dict[str, Any]:
    """The processor facts of a family that change what a sample becomes (JSON-plain: lists, not tuples)."""
    v = vision_or_default(vision)
    return {"patch_size": v.patch_size, "merge_size": v.merge_size, "temporal_patch_size": v.temporal_patch_size,
            "pixel_mean": list(v.pixel_mean), "pixel_std": list(v.pixel_std), "video_time": v.video_time,
            "tokens_per_second": v.tokens_per_second}


def sample_fingerprint(cfg: DataConfig, vision: VisionProcessing | None = None) -> dict[str, Any]:
    """The settings that decide which tokens and pixels a sample becomes, by recipe key (module docstring), for the
    model family's processor facts `vision` (None: Qwen2-VL's)."""
    v = vision_or_default(vision)
    video = cfg.resolved_video(v)
    lo, hi = cfg.image_pixels(v)
    fp: dict[str, Any] = {
        "data.tokenizer": tokenizer_hash(cfg.tokenizer),
        "model.family": v.family,
        "model.family (processor facts)": family_facts(v),
        "data.min_pixels": lo,
        "data.max_pixels": hi,
        **{f"data.video.{k}": getattr(video, k) for k in _VIDEO_KEYS},
        "data.default_system": cfg.system_prompt(v),
        "data.supervise": cfg.supervise,
        "data.pretrain_eos": cfg.pretrain_eos,
        "data.max_tokens (overlong: truncate)": cfg.max_tokens if cfg.overlong == "truncate" else None,
    }
    for ds in cfg.datasets:
        fp[f"data.datasets[{ds.label}]"] = {"kind": ds.kind, "supervise": ds.supervise, "append_eod": ds.append_eod}
    return fp


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: saved -> now' for every setting both fingerprints have and that differs (a dataset only in one of
    them is the loader's business; a tokenizer that cannot be read now is the loader's error to give)."""
    out = []
    for key, value in now.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "data.tokenizer":
            if value is None or saved[key] is None:
                continue
            out.append(f"data.tokenizer: another tokenizer.json (sha256 {str(saved[key])[:12]}... -> {value[:12]}...)")
        else:
            out.append(f"{key}: {saved[key]!r} -> {value!r}")
    return out


__all__ = ["family_facts", "fingerprint_changes", "sample_fingerprint", "tokenizer_hash"]
