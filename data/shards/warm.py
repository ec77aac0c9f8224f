"""Fill the video decode cache ahead of training (`python -m data.shards warm`).

Reads a dataset exactly as the loader does (its manifest or sidecar indexes, the shard reader of data/sources.py,
the sample's own media resolution), so every video the loader will decode is decoded once here, under the key
the loader will look up: after a warm, training never waits for a decode of these videos. The key depends on every
setting that changes the frames, the model family's resize factor included, so the settings must be the run's:
`recipe_data` reads them (and the datasets, training and eval) from the training recipe itself, `recipe_family` its
model family.

The summary counts video references (a video used by several samples is one reference each), distinct videos (cache
keys), the ones decoded now and the ones whose entry was in the cache before this warm began.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections import Counter
from pathlib import Path

from core.config import expand_env, from_dict, load_yaml
from data.chatml import SkipSample, parse_sample
from data.config import DataConfig, DatasetSpec
from data.media.video import VideoConfig, VideoDecodeError
from data.media.video_cache import METRICS, cache_key, content_identity, get_cache
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
    out: dict = {"videos": 0, "cached": 0, "decoded": 0, "failed": Counter(), "keys": set()}
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
            ident = identity if (identity and vcfg.cache_trust_identity) else content_identity(data)
            out["keys"].add(cache_key(ident, vcfg, vision))  # the key get_or_decode looks up
            before = METRICS.snapshot()["decodes"]
            try:
                cache.get_or_decode(data, vcfg, identity, vision=vision)
            except VideoDecodeError as e:
                out["failed"][e.reason] += 1
                log.warning("warm: %s %s: %s", raw.key, ref, e)
                continue
            out["decoded" if METRICS.snapshot()["decodes"] > before else "cached"] += 1
    return out


def recipe_data(recipe: str | Path) -> tuple[DataConfig, list[DatasetSpec]]:
    """A training recipe's data section (its base files merged, ${VAR}s expanded, checked like the run's) and its
    datasets: data.datasets, then eval.datasets (the evaluation reads them with the run's data settings too)."""
    raw = load_yaml(recipe)
    data = from_dict(DataConfig, expand_env(raw.get("data") or {}, "data"), "data")
    evals = expand_env((raw.get("eval") or {}).get("datasets") or [], "eval.datasets")
    return data, [*data.datasets, *(from_dict(DatasetSpec, d, f"eval.datasets[{i}]") for i, d in enumerate(evals))]


def cached_keys(cache_dir: str) -> set[str]:
    """The keys of the entries in a cache directory (data/media/video_cache.py: <root>/<k[:2]>/<key>.frames)."""
    root = Path(cache_dir)
    return {f.name[: -len(".frames")] for f in root.glob("*/*.frames")} if root.is_dir() else set()


def recipe_family(recipe: str | Path) -> tuple[str, str]:
    """(family, where it came from) of a training recipe: model.family, else the family of the HF directory in
    model.hf_config or model.init_from, else the default family."""
    from model.family import DEFAULT_FAMILY
    from model.hf_adapter import is_hf_dir
    from model.resolve import hf_config

    model = expand_env(load_yaml(recipe).get("model") or {}, "model")
    if model.get("family"):
        return str(model["family"]), "the recipe's model.family"
    for key in ("hf_config", "init_from"):
        src = model.get(key)
        if src and is_hf_dir(src):
            return hf_config(src).family, f"the config.json of the recipe's model.{key}"
    return DEFAULT_FAMILY, "the default family (the recipe names none)"


def warm(paths: list[str | DatasetSpec], vcfg: VideoConfig, storage_cfg: StorageConfig | None = None,
         workers: int = 1, vision: VisionProcessing | None = None) -> dict:
    """Decode every video of the datasets (paths or specs) into `vcfg.cache_dir`, for the model family's processor
    facts `vision` (None: Qwen2-VL's: its resize factor decides the frames and the cache key); one job per shard."""
    if not vcfg.cache_dir:
        raise ValueError("warm needs a cache directory (--cache-dir)")
    scfg = storage_cfg or StorageConfig()
    before = cached_keys(os.fspath(vcfg.cache_dir))
    jobs = []
    for p in paths:
        spec = p if isinstance(p, DatasetSpec) else DatasetSpec(path=p)
        plan = plan_dataset(0, spec, scfg)
        jobs += [(spec, s, vcfg, scfg, vision) for s in range(len(plan.shards))]
    total: dict = {"shards": len(jobs), "videos": 0, "cached": 0, "decoded": 0, "failed": Counter()}
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_warm_shard, jobs))
    else:
        results = [_warm_shard(j) for j in jobs]
    keys: set[str] = set()
    for r in results:
        for k in ("videos", "cached", "decoded"):
            total[k] += r[k]
        total["failed"].update(r["failed"])
        keys |= r["keys"]
    total["failed"] = dict(total["failed"])
    total["distinct"] = len(keys)
    total["in_cache_before"] = len(keys & before)
    return total
