"""The decode cache: hits equal decodes, every frame-changing parameter changes the key, corrupt entries are
dropped and re-decoded, one process decodes while the others wait (real processes), waits are bounded, stale
locks are broken, LRU eviction keeps the cap, bad videos are remembered, and the warm CLI fills the cache."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from video_clips import encode_clip

from data.media import video_cache as vc
from data.media.video import VideoConfig, VideoDecodeError, decode_frames
from data.media.video_cache import load_video
from data.media.vision import family_vision
from data.shards import index_dir
from data.shards.__main__ import main as shards_main


@pytest.fixture(autouse=True)
def _fresh_metrics():
    vc.METRICS.reset()
    vc._CACHES.clear()
    yield


def _entries(root):
    return sorted(p for p, _, _ in vc.get_cache(VideoConfig(cache_dir=str(root)))._entries())


def test_hit_equals_cold_decode_and_keys_cover_parameters(tmp_path):
    data = encode_clip(320, 240, 60, 30)
    cfg = VideoConfig(cache_dir=str(tmp_path))
    cold = load_video(data, VideoConfig())
    first = load_video(data, cfg)
    hit = load_video(data, cfg)
    assert torch.equal(cold.pixel_values, first.pixel_values) and torch.equal(cold.pixel_values, hit.pixel_values)
    assert hit.grid_thw == cold.grid_thw and hit.frame_indices == cold.frame_indices and hit.fps_used == cold.fps_used
    assert vc.cache_metrics()["hits"] == 1 and vc.cache_metrics()["decodes"] == 1
    ident = vc.content_identity(data)
    base = vc.cache_key(ident, cfg)
    for change in [dict(fps=1.0), dict(min_pixels=64 * 784), dict(max_pixels=512 * 784), dict(max_tokens=8192),
                   dict(backend="ffmpeg"), dict(min_frames=8), dict(max_frames=64), dict(frame_count_tolerance=0.1)]:
        assert vc.cache_key(ident, VideoConfig(cache_dir=str(tmp_path), **change)) != base, change
    # Parameters that do not change the frames do not change the key.
    assert vc.cache_key(ident, VideoConfig(cache_dir="/elsewhere", decode_timeout_s=5, decode_threads=1)) == base
    # The family's frame facts: Qwen2.5-VL's are Qwen2-VL's (same entries); Qwen3-VL's factor 32 gives other frames.
    # Unset frame bounds key as the family's values they stand for.
    q2, q25, q3 = (family_vision(f) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
    assert vc.cache_key(ident, cfg, q2) == base == vc.cache_key(ident, cfg, q25)
    assert vc.cache_key(ident, cfg, q3) != base
    assert vc.cache_key(ident, VideoConfig(min_pixels=128 * 784, max_pixels=768 * 784), q2) == base
    explicit = VideoConfig(min_pixels=128 * 1024, max_pixels=768 * 1024)  # the same bounds for both factors
    assert vc.cache_key(ident, explicit, q2) != vc.cache_key(ident, explicit, q3)
    assert vc.cache_key(ident, VideoConfig(min_pixels=128 * 784, max_pixels=768 * 784), q3) != vc.cache_key(
        ident, cfg, q3)
    # By default the identity a caller passes is a name, not a version: the key follows the content, so a
    # video rewritten under the same name is decoded anew. With cache_trust_identity the identity alone keys it.
    other = encode_clip(320, 240, 61, 30)
    load_video(data, cfg, identity="same-name")
    b = load_video(other, cfg, identity="same-name")
    assert torch.equal(b.pixel_values, load_video(other, VideoConfig()).pixel_values)
    trusting = VideoConfig(cache_dir=str(tmp_path), cache_trust_identity=True)
    load_video(data, trusting, identity="etag-1")
    assert torch.equal(load_video(other, trusting, identity="etag-1").pixel_values, cold.pixel_values)


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "garbage_header"])
def test_corrupt_entry_is_dropped_and_redecoded(tmp_path, damage):
    data = encode_clip(320, 240, 60, 30)
    cfg = VideoConfig(cache_dir=str(tmp_path))
    good = load_video(data, cfg)
    (path,) = _entries(tmp_path)
    raw = bytearray(Path(path).read_bytes())
    if damage == "flip_payload_byte":
        raw[-1000] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[:8] = b"garbage!"
    Path(path).write_bytes(bytes(raw))
    again = load_video(data, cfg)
    assert torch.equal(again.pixel_values, good.pixel_values)
    m = vc.cache_metrics()
    assert m["corrupt_dropped"] == 1 and m["decodes"] == 2
    assert load_video(data, cfg) is not None and vc.cache_metrics()["hits"] == 1  # the rewritten entry is good


def _slow_counting_decode(count_path):
    def decode(data, cfg):
        with open(count_path, "a") as f:  # O_APPEND: one line per decode, from any process
            f.write(f"{os.getpid()}\n")
        time.sleep(0.6)  # a slow decode: the other processes arrive while it runs
        return decode_frames(data, cfg)

    return decode


def _worker(args):
    root, count_path, start_at = args
    vc._CACHES.clear()
    cfg = VideoConfig(cache_dir=root, decode_timeout_s=30)
    while time.time() < start_at:
        time.sleep(0.001)
    sf = vc.get_cache(cfg).get_or_decode(encode_clip(320, 240, 60, 30), cfg, decode=_slow_counting_decode(count_path))
    return sf.frames_FHWC.tobytes(), vc.cache_metrics()


@pytest.mark.timeout(120)
def test_processes_share_one_decode_and_never_read_a_torn_entry(tmp_path):
    """4 real processes miss the same video at the same moment: exactly one decodes, the others wait for its
    entry and read exactly its frames."""
    count_path = str(tmp_path / "decodes.txt")
    start_at = time.time() + 1.0
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.map(_worker, [(str(tmp_path / "cache"), count_path, start_at)] * 4)
    decoders = Path(count_path).read_text().split()
    assert len(decoders) == 1, decoders
    frames = {r[0] for r in results}
    assert len(frames) == 1
    expect = decode_frames(encode_clip(320, 240, 60, 30), VideoConfig()).frames_FHWC.tobytes()
    assert frames == {expect}
    assert sum(r[1]["waits"] for r in results) == 3 and sum(r[1]["corrupt_dropped"] for r in results) == 0


def _hammer_reader(args):
    root, key, n = args
    vc._CACHES.clear()
    cache = vc.get_cache(VideoConfig(cache_dir=root))
    seen = set()
    for _ in range(n):
        sf = cache.get(key)
        if sf is not None:
            seen.add(int(sf.frames_FHWC[0, 0, 0, 0]))
    return seen, vc.cache_metrics()["corrupt_dropped"]


@pytest.mark.timeout(120)
def test_concurrent_rewrites_are_never_torn(tmp_path):
    """A writer replaces one entry 60 times with different frames while 2 reader processes read it: readers see
    only whole entries (a value the writer wrote, never a checksum failure)."""
    root = str(tmp_path)
    cache = vc.get_cache(VideoConfig(cache_dir=root))
    key = "ab" + "0" * 62
    frames = np.zeros((8, 224, 224, 3), np.uint8)
    cache.put(key, vc.SampledFrames(frames, list(range(8)), 2.0))
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_hammer_reader, [(root, key, 400)] * 2)
        for v in range(1, 61):
            frames[:] = v
            cache.put(key, vc.SampledFrames(frames, list(range(8)), 2.0))
        out = res.get(timeout=100)
    for seen, corrupt in out:
        assert corrupt == 0
        assert seen and seen <= set(range(61))


@pytest.mark.timeout(60)
def test_waiting_is_bounded_then_decodes_itself(tmp_path):
    data = encode_clip(320, 240, 30, 30)
    cfg = VideoConfig(cache_dir=str(tmp_path), cache_wait_s=0.4)
    cache = vc.get_cache(cfg)
    key = vc.cache_key(vc.content_identity(data), cfg)
    lock = cache._path(key, ".lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as f:  # held by a live process (this one) that never finishes
        f.write(f"{cache._host} {os.getpid()} {time.time()}")
    t0 = time.monotonic()
    sf = cache.get_or_decode(data, cfg)
    # It waited its cache_wait_s for the lock's live holder (a lower bound, which no load breaks), then gave up
    # and decoded itself.
    assert time.monotonic() - t0 >= 0.4 and sf.frames_FHWC.shape[0] == 4
    m = vc.cache_metrics()
    assert m["waits"] == 1 and m["wait_timeouts"] == 1 and m["decodes"] == 1, m
    assert os.path.exists(lock)  # the live holder's lock is left alone


def test_lock_of_a_dead_process_is_broken(tmp_path):
    data = encode_clip(320, 240, 30, 30)
    cfg = VideoConfig(cache_dir=str(tmp_path), cache_wait_s=30)
    cache = vc.get_cache(cfg)
    key = vc.cache_key(vc.content_identity(data), cfg)
    p = mp.get_context("fork").Process(target=lambda: None)
    p.start()
    p.join()
    lock = cache._path(key, ".lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as f:
        f.write(f"{cache._host} {p.pid} {time.time()}")
    cache.get_or_decode(data, cfg)
    m = vc.cache_metrics()
    # Broken at once: no wait for the dead holder (cache_wait_s=30), and decoded here.
    assert m["stale_locks_broken"] == 1 and m["waits"] == 0 and m["wait_timeouts"] == 0 and m["decodes"] == 1, m


def test_lru_eviction_keeps_the_cap(tmp_path):
    entry = np.zeros((4, 112, 112, 3), np.uint8)
    size = entry.nbytes
    cache = vc.VideoCache(str(tmp_path), max_bytes=int(size * 3.5), wait_s=1, stale_lock_s=60)
    keys = [f"{i:02d}" + "f" * 62 for i in range(5)]
    for i, k in enumerate(keys[:3]):
        cache.put(k, vc.SampledFrames(entry + i, [0, 1, 2, 3], 2.0))
        os.utime(cache._path(k, ".frames"), (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(keys[0]) is not None  # a hit: keys[0] becomes the youngest
    cache.put(keys[3], vc.SampledFrames(entry, [0, 1, 2, 3], 2.0))
    cache.put(keys[4], vc.SampledFrames(entry, [0, 1, 2, 3], 2.0))
    left = {k for k in keys if os.path.exists(cache._path(k, ".frames"))}
    assert cache.total_bytes() <= size * 3.5
    assert keys[1] not in left and keys[0] in left and keys[4] in left, left
    assert vc.cache_metrics()["evicted_entries"] >= 1


def test_bad_video_is_remembered(tmp_path):
    cfg = VideoConfig(cache_dir=str(tmp_path))
    bad = encode_clip(320, 240, 60, 30)[:3000]
    for _ in range(3):
        with pytest.raises(VideoDecodeError):
            load_video(bad, cfg)
    m = vc.cache_metrics()
    assert m["decodes"] == 1 and m["negative_hits"] == 2


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return b.getvalue()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_warm_cli_fills_the_cache_the_loader_reads(tmp_path, family):
    """Shards with a video member and a video referenced by path; after `warm --family F`, loading those bytes for
    that family is a hit (for a family of another resize factor, a miss)."""
    v1, v2 = encode_clip(320, 240, 45, 30), encode_clip(200, 150, 30, 30)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "clips").mkdir()
    (ds / "clips" / "b.mp4").write_bytes(v2)
    msg = lambda ref: json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "video": ref}]}]})
    (ds / "shard-000000.tar").write_bytes(
        _tar_bytes({"a.json": msg("a.clip.mp4").encode(), "a.clip.mp4": v1, "b.json": msg("clips/b.mp4").encode()})
    )
    (ds / "shard-000001.tar").write_bytes(_tar_bytes({"c.json": msg("broken.mp4").encode(), "c.broken.mp4": b"xx"}))
    cache_dir = tmp_path / "cache"
    index_dir(str(ds))  # the loader (and so warm) reads shards through their sidecar indexes
    rc = shards_main(["warm", "--data", str(ds), "--cache-dir", str(cache_dir), "--workers", "1", "--family", family])
    assert rc == 0
    m = vc.cache_metrics()
    assert m["decodes"] == 3 and m["writes"] == 2
    vc.METRICS.reset()
    cfg, vision = VideoConfig(cache_dir=str(cache_dir)), family_vision(family)
    clip = load_video(v1, cfg, identity="ds/shard-000000/a.a.clip.mp4", vision=vision)
    load_video(v2, cfg, identity=str(ds / "clips" / "b.mp4"), vision=vision)
    with pytest.raises(VideoDecodeError):
        load_video(b"xx", cfg, vision=vision)
    m = vc.cache_metrics()
    assert m["hits"] == 2 and m["negative_hits"] == 1 and m["decodes"] == 0
    assert clip.rows_u8.shape[1] == 3 * 2 * vision.patch_size**2
    other = family_vision("qwen3_vl" if family == "qwen2_vl" else "qwen2_vl")
    load_video(v1, cfg, vision=other)
    assert vc.cache_metrics()["decodes"] == 1
