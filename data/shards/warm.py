"""Fill the video decode cache ahead of training (`python -m data.shards warm`).

Reads a dataset exactly as the loader does (its manifest or sidecar indexes, the shard reader of data/sources.py,
the sample's own media resolution), so every video the loader will decode is decoded once here, under the key
the loader will look up (for the family given: its resize factor is part of the key): after a warm, training never
waits for a decode of these videos.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from collections import Counter

from data.chatml import SkipSample, parse_sample
from data.config import DatasetSpec
from data.media.video import VideoConfig, VideoDecodeError
from data.media.video_cache import METRICS, get_cache
from data.sample import media_bytes
from data.sources import Reader, plan_dataset
from data.storage import StorageConfig
from model.processing import VisionProcessing

log = logging.getLogger("data.shards.warm")

_READ_CHUNK = 16 << 20


def _warm_shard(job: tuple) -> dict:
    spec, shard, vcfg, scfg, vision = job
    plan = plan_dataset(0, spec, scfg)
    reader = Reader(plan, scfg, _READ_CHUNK)
    cache = get_cache(vcfg)
    out: dict = {"videos": 0, "cached": 0, "decoded": 0, "failed": Counter()}
    n = plan.shards[shard].samples
    for i in range(n):
        raw = reader.read(shard, i, upto=n)
        try:
            parsed = parse_sample(json.loads((raw.members or {})["json"]), spec.kind)
        except (KeyError, ValueError, SkipSample):
            continue  # not a usable sample: the loader skips it too (and counts why)
        for mtype, ref in parsed.media:
            if mtype != "video":
                continue
            out["videos"] += 1
            try:
                data, identity = media_bytes(raw, ref, scfg)
            except SkipSample as e:
                out["failed"][e.reason] += 1
                log.warning("warm: %s: %s", raw.key, e)
                continue
            before = METRICS.snapshot()["decodes"]
            try:
                cache.get_or_decode(data, vcfg, identity, vision=vision)
            except VideoDecodeError as e:
                out["failed"][e.reason] += 1
                log.warning("warm: %s %s: %s", raw.key, ref, e)
                continue
            out["decoded" if METRICS.snapshot()["decodes"] > before else "cached"] += 1
    return out


def warm(paths: list[str], vcfg: VideoConfig, storage_cfg: StorageConfig | None = None, workers: int = 1,
         vision: VisionProcessing | None = None) -> dict:
    """Decode every video of the datasets under `paths` into `vcfg.cache_dir`, for the model family's processor facts
    `vision` (None: Qwen2-VL's: its resize factor decides the frames and the cache key); one job per shard."""
    if not vcfg.cache_dir:
        raise ValueError("warm needs a cache directory (--cache-dir)")
    scfg = storage_cfg or StorageConfig()
    jobs = []
    for p in paths:
        spec = DatasetSpec(path=p)
        plan = plan_dataset(0, spec, scfg)
        jobs += [(spec, s, vcfg, scfg, vision) for s in range(len(plan.shards))]
    total: dict = {"shards": len(jobs), "videos": 0, "cached": 0, "decoded": 0, "failed": Counter()}
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_warm_shard, jobs))
    else:
        results = [_warm_shard(j) for j in jobs]
    for r in results:
        for k in ("videos", "cached", "decoded"):
            total[k] += r[k]
        total["failed"].update(r["failed"])
    total["failed"] = dict(total["failed"])
    return total
