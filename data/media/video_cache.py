"""Local-disk cache of decoded videos: sampled, resized uint8 frames, so a video is decoded once per node.

    python -m data.shards warm --data s3://bucket/videos-shards --cache-dir /local/vcache [--workers 8]

Key: sha256 of the video's identity and of every parameter that changes the frames (fps, min/max frames,
min/max pixels in force, max tokens, frame-count tolerance, the family's patch / merge / temporal patch sizes (so
its resize factor), resize method, decoder backend and its version, entry format).
The identity is the content's sha256 by default, so an object rewritten under the same name can never serve
stale frames; with `VideoConfig.cache_trust_identity` the caller's identity (an ETag) is used as is and the
content is not hashed.

Concurrency (DataLoader workers and ranks of one node sharing the directory):
  * writes go to a temp file in the same file system, then os.replace: a reader sees the whole entry or none;
  * the first process to miss creates `<key>.lock` with O_CREAT | O_EXCL and decodes; the others poll for the
    entry up to `cache_wait_s`, then decode themselves (the atomic rename makes a duplicate write harmless);
    a lock whose holder died (same host: its pid is gone) or that is older than the decode timeout is broken;
  * every entry carries a CRC32 of its metadata and of its frames: a corrupt or short entry is counted,
    removed and re-decoded, never returned;
  * a deterministic decode failure (corrupt video) is remembered as `<key>.err` so other workers skip the video
    without decoding it again; timeouts are not remembered (the next try may have more time);
  * the directory is capped at `cache_max_bytes`: least recently used entries (mtime, refreshed on every hit)
    are evicted under a directory-wide O_EXCL lock when a process's estimate passes the cap; estimates are
    refreshed from a directory scan at least every 30 s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from core.process import pid_alive
from data.media.video import (
    RESIZE_METHOD,
    SampledFrames,
    VideoClip,
    VideoConfig,
    VideoDecodeError,
    backend_version,
    decode_frames,
    frames_to_clip,
)
from data.media.vision import vision_or_default
from model.processing import VisionProcessing

log = logging.getLogger("data.media.video_cache")

FORMAT_VERSION = 1
_MAGIC = b"QVC1"
# magic, format, meta length, payload length, meta crc32, payload crc32
_HEADER = struct.Struct("<4sIIQII")
_SUFFIX = ".frames"
_RESCAN_S = 30.0
_LOW_WATER = 0.9  # evict down to this fraction of the cap so eviction does not run on every write


class CacheMetrics:
    FIELDS = (
        "hits",
        "misses",
        "decodes",
        "writes",
        "waits",
        "wait_timeouts",
        "corrupt_dropped",
        "negative_hits",
        "stale_locks_broken",
        "evicted_entries",
        "evicted_bytes",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f: getattr(self, f) for f in self.FIELDS}


METRICS = CacheMetrics()


def cache_metrics() -> dict[str, int]:
    """This process's cache counters (forked workers start at zero; the loader sums them)."""
    return METRICS.snapshot()


def cache_key(identity: str, cfg: VideoConfig, vision: VisionProcessing | None = None) -> str:
    """sha256 over the identity and every parameter that changes the cached frames (`vision` None: Qwen2-VL's)."""
    v = vision_or_default(vision)
    min_pixels, max_pixels = cfg.frame_pixels(v)
    params = {
        "identity": identity,
        "format": FORMAT_VERSION,
        "backend": backend_version(cfg.backend),
        "resize": RESIZE_METHOD,
        "fps": cfg.fps,
        "min_frames": cfg.min_frames,
        "max_frames": cfg.max_frames,
        "min_pixels": min_pixels,  # in force: null (the family's default) and its value give the same frames
        "max_pixels": max_pixels,
        "max_tokens": cfg.token_cap,  # 0 (automatic, unlowered) and 16384 give the same frames
        "frame_count_tolerance": cfg.frame_count_tolerance,
        "patch_size": v.patch_size,  # the resize factor (patch x merge) and the frame pairs
        "merge_size": v.merge_size,
        "temporal_patch_size": v.temporal_patch_size,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def content_identity(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VideoCache:
    def __init__(self, root: str, max_bytes: int, wait_s: float, stale_lock_s: float):
        self.root = os.path.abspath(root)
        self.max_bytes = int(max_bytes)
        self.wait_s = float(wait_s)
        self.stale_lock_s = float(stale_lock_s)
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(self._tmp, exist_ok=True)
        self._host = socket.gethostname()
        self._approx_bytes: int | None = None
        self._scanned_at = 0.0

    # ---------------------------------------------------------------- paths
    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.root, key[:2], key + suffix)

    # ---------------------------------------------------------------- entries
    def get(self, key: str) -> SampledFrames | None:
        """The entry, or None if absent; a corrupt entry is removed, counted and reported as absent."""
        path = self._path(key, _SUFFIX)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    raise ValueError("short header")
                magic, fmt, meta_len, payload_len, meta_crc, payload_crc = _HEADER.unpack(head)
                if magic != _MAGIC or fmt != FORMAT_VERSION:
                    raise ValueError(f"bad magic/format {magic!r}/{fmt}")
                meta_b = f.read(meta_len)
                payload = np.empty(payload_len, np.uint8)
                got = f.readinto(memoryview(payload))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error) as e:
            self._drop_corrupt(path, str(e))
            return None
        try:
            if got != payload_len or len(meta_b) != meta_len:
                raise ValueError(f"short entry ({got} of {payload_len} frame bytes)")
            if zlib.crc32(meta_b) != meta_crc or zlib.crc32(payload) != payload_crc:
                raise ValueError("checksum mismatch")
            meta = json.loads(meta_b)
            frames = payload.reshape(meta["shape"])
        except (ValueError, KeyError, TypeError) as e:
            self._drop_corrupt(path, str(e))
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: a hit makes the entry young
        return SampledFrames(frames, meta["frame_indices"], meta["fps_used"], meta.get("meta", {}))

    def _drop_corrupt(self, path: str, why: str) -> None:
        METRICS.add(corrupt_dropped=1)
        log.warning("video cache: dropping corrupt entry %s (%s)", path, why)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def put(self, key: str, sf: SampledFrames) -> None:
        frames = np.ascontiguousarray(sf.frames_FHWC, dtype=np.uint8)
        meta_b = json.dumps(
            {"shape": list(frames.shape), "frame_indices": list(sf.frame_indices), "fps_used": sf.fps_used,
             "meta": sf.meta}  # fmt: skip
        ).encode()
        payload = memoryview(frames.reshape(-1))
        head = _HEADER.pack(_MAGIC, FORMAT_VERSION, len(meta_b), frames.nbytes, zlib.crc32(meta_b), zlib.crc32(payload))
        final = self._path(key, _SUFFIX)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(self._tmp, f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(meta_b)
                f.write(payload)
            os.replace(tmp, final)  # atomic: readers see all of the entry or none of it
        except OSError as e:
            # A full or read-only disk must not stop training: the frames are still returned to the caller.
            log.warning("video cache: cannot write %s: %s", final, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        METRICS.add(writes=1)
        self._account(len(head) + len(meta_b) + frames.nbytes)

    # ---------------------------------------------------------------- negative entries
    def _get_error(self, key: str) -> VideoDecodeError | None:
        try:
            with open(self._path(key, ".err")) as f:
                d = json.load(f)
            return VideoDecodeError(d["message"], d["reason"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _put_error(self, key: str, e: VideoDecodeError) -> None:
        path = self._path(key, ".err")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(self._tmp, f"{key}.{os.getpid()}.err.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"message": str(e), "reason": e.reason}, f)
            os.replace(tmp, path)
        except OSError:
            pass

    # ---------------------------------------------------------------- locks
    def _try_lock(self, key: str) -> bool:
        path = self._path(key, ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if self._lock_is_stale(path):
                METRICS.add(stale_locks_broken=1)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return self._try_lock(key)
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{self._host} {os.getpid()} {time.time()}")
        return True

    def _lock_is_stale(self, path: str) -> bool:
        try:
            with open(path) as f:
                host, pid, _ = f.read().split()
            age = time.time() - os.stat(path).st_mtime
        except (FileNotFoundError, ValueError):
            return False  # being written right now, or just released
        if host == self._host and not pid_alive(int(pid)):
            return True
        return age > self.stale_lock_s

    def _unlock(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key, ".lock"))

    # ---------------------------------------------------------------- the entry point
    def get_or_decode(self, data: bytes, cfg: VideoConfig, identity: str | None = None,
                      decode: Callable[[bytes, VideoConfig], SampledFrames] | None = None,
                      vision: VisionProcessing | None = None) -> SampledFrames:
        """Frames from the cache, or decoded (by this process or, if it is faster, another one) and stored, for the
        family's facts `vision` (None: Qwen2-VL's). `decode(data, cfg)`: default decode_frames at `vision`."""
        ident = identity if (identity and cfg.cache_trust_identity) else content_identity(data)
        key = cache_key(ident, cfg, vision)
        if decode is None:
            decode = functools.partial(decode_frames, vision=vision)
        sf = self._lookup(key)
        if sf is not None:
            return sf
        METRICS.add(misses=1)
        t_end = time.monotonic() + self.wait_s
        delay = 0.01
        waited = False
        while True:
            if self._try_lock(key):
                try:
                    sf = self.get(key)  # another process may have finished between our miss and the lock
                    if sf is not None:
                        return sf
                    return self._decode_and_store(key, data, cfg, decode)
                finally:
                    self._unlock(key)
            if not waited:
                METRICS.add(waits=1)
                waited = True
            if time.monotonic() >= t_end:
                METRICS.add(wait_timeouts=1)
                return self._decode_and_store(key, data, cfg, decode)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            sf = self._lookup(key)
            if sf is not None:
                return sf

    def _lookup(self, key: str) -> SampledFrames | None:
        """A stored entry (counted as a hit), a remembered failure (counted, raised), or None."""
        sf = self.get(key)
        if sf is not None:
            METRICS.add(hits=1)
            return sf
        err = self._get_error(key)
        if err is not None:
            METRICS.add(negative_hits=1)
            raise err
        return None

    def _decode_and_store(self, key: str, data: bytes, cfg: VideoConfig, decode) -> SampledFrames:
        METRICS.add(decodes=1)
        try:
            sf = decode(data, cfg)
        except VideoDecodeError as e:
            if e.reason != "timeout":
                self._put_error(key, e)
            raise
        self.put(key, sf)
        return sf

    # ---------------------------------------------------------------- size cap
    def _entries(self) -> Iterator[tuple[str, int, float]]:
        for d in os.scandir(self.root):
            if not d.is_dir() or d.name == "tmp":
                continue
            for e in os.scandir(d.path):
                if e.name.endswith(_SUFFIX):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    yield e.path, st.st_size, st.st_mtime

    def total_bytes(self) -> int:
        return sum(s for _, s, _ in self._entries())

    def _account(self, nbytes: int) -> None:
        now = time.monotonic()
        if self._approx_bytes is None or now - self._scanned_at > _RESCAN_S:
            self._approx_bytes = self.total_bytes()
            self._scanned_at = now
        else:
            self._approx_bytes += nbytes
        if self._approx_bytes > self.max_bytes:
            self.evict()

    def evict(self) -> None:
        """Remove least recently used entries until the directory is under 90% of the cap (one process at a
        time; a process that finds the eviction lock taken leaves it to the holder)."""
        lock = os.path.join(self.root, ".evict.lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(lock).st_mtime > 300:
                    os.unlink(lock)  # a crashed evictor
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            entries = sorted(self._entries(), key=lambda x: x[2])
            total = sum(s for _, s, _ in entries)
            target = self.max_bytes * _LOW_WATER
            for path, size, _ in entries:
                if total <= target:
                    break
                try:
                    os.unlink(path)  # a reader that already opened it keeps reading its inode
                except FileNotFoundError:
                    continue
                total -= size
                METRICS.add(evicted_entries=1, evicted_bytes=size)
            self._approx_bytes = total
            self._scanned_at = time.monotonic()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)


_CACHES: dict[tuple, VideoCache] = {}
_CACHES_LOCK = threading.Lock()


def get_cache(cfg: VideoConfig) -> VideoCache:
    """The process's cache object for cfg.cache_dir (created on first use)."""
    if not cfg.cache_dir:
        raise ValueError("video.cache_dir is not set")
    wait = cfg.cache_wait_s or cfg.decode_timeout_s
    key = (os.path.abspath(cfg.cache_dir), cfg.cache_max_bytes, wait, cfg.decode_timeout_s)
    with _CACHES_LOCK:
        c = _CACHES.get(key)
        if c is None:
            # A lock older than the decode timeout plus a margin belongs to a process that hung or died.
            c = VideoCache(cfg.cache_dir, cfg.cache_max_bytes, wait, stale_lock_s=cfg.decode_timeout_s + 30.0)
            _CACHES[key] = c
    return c


def _after_fork() -> None:
    global _CACHES_LOCK
    _CACHES_LOCK = threading.Lock()
    METRICS.reset()


os.register_at_fork(after_in_child=_after_fork)


def load_video(data: bytes, cfg: VideoConfig, identity: str | None = None,
               vision: VisionProcessing | None = None) -> VideoClip:
    """The loader's entry point: bytes of a video file -> VideoClip for the family's facts `vision` (None:
    Qwen2-VL's), through the decode cache when `cfg.cache_dir` is set. `identity` (e.g. the storage ETag of the
    object) keys the cache; None = the content hash. Raises VideoDecodeError for unusable videos."""
    if cfg.cache_dir:
        sf = get_cache(cfg).get_or_decode(data, cfg, identity, vision=vision)
    else:
        sf = decode_frames(data, cfg, vision)
    return frames_to_clip(sf, vision)
