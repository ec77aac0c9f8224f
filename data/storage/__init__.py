"""One small storage interface for local paths, s3:// and oss:// URLs.

Everything the loader reads (shards, their sidecar indexes, media referenced by URL) goes through
`get_storage(url, cfg).read(...)` / `.read_range(...)`. Backends:

    local paths, file://   LocalStorage (data/storage/local.py)
    s3://bucket/key        S3Storage (data/storage/s3.py, boto3; `endpoint_url` makes OSS's S3-compatible
                           endpoint, MinIO, Ceph or a local test server work)
    oss://bucket/key       OssStorage (data/storage/oss.py, oss2; endpoint/region from the recipe or the
                           environment, credentials from OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET /
                           OSS_SESSION_TOKEN)

The object-store backends retry throttling (503 / SlowDown / 429), connection resets, timeouts and truncated
bodies with exponential backoff and jitter; a broken ranged read resumes where it stopped (If-Match the first
ETag); requests in flight and requests per second are capped per process; permanent errors (403, NoSuchKey)
raise at once with the URL in the message and never the credentials (data/storage/retry.py,
data/storage/errors.py, the shared ObjectStore in data/storage/base.py). `storage_metrics()` returns this
process's retry counters for the loader to report. See docs/storage_video.md.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from data.storage.base import ObjectStore, Storage, split_url
from data.storage.config import StorageConfig
from data.storage.errors import (
    ObjectChangedError,
    ObjectNotFoundError,
    StorageAccessDenied,
    StorageError,
    StorageRetriesExhausted,
    StorageUnreachable,
    scrub,
)
from data.storage.local import LocalStorage
from data.storage.retry import METRICS

__all__ = [
    "StorageConfig",
    "Storage",
    "ObjectStore",
    "LocalStorage",
    "get_storage",
    "storage_metrics",
    "reset_storage_metrics",
    "split_url",
    "StorageError",
    "ObjectNotFoundError",
    "StorageAccessDenied",
    "ObjectChangedError",
    "StorageRetriesExhausted",
    "StorageUnreachable",
    "scrub",
]

_LOCAL = LocalStorage()
_BACKENDS: dict[tuple, Storage] = {}
_BACKENDS_LOCK = threading.Lock()


def _reset_after_fork() -> None:
    # A forked DataLoader worker must not reuse the parent's HTTP connection pools (shared sockets) or a lock
    # a parent thread held at fork time: build fresh clients in the child.
    global _BACKENDS_LOCK
    _BACKENDS_LOCK = threading.Lock()
    _BACKENDS.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def get_storage(url: str, cfg: StorageConfig | None = None) -> Storage:
    """The backend for a URL's scheme, built once per process and configuration (so the in-flight and
    request-rate limits are shared by every reader in the process)."""
    if "://" not in url or url.startswith("file://"):
        return _LOCAL
    scheme = url.split("://", 1)[0]
    cfg = cfg or StorageConfig()
    key = (scheme, dataclasses.astuple(cfg))
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(key)
        if backend is None:
            if scheme == "s3":
                from data.storage.s3 import S3Storage

                backend = S3Storage(cfg)
            elif scheme == "oss":
                from data.storage.oss import OssStorage

                backend = OssStorage(cfg)
            else:
                raise ValueError(
                    f"unsupported storage scheme {scheme!r} in {scrub(url)!r} "
                    "(supported: local paths, file://, s3://, oss://)"
                )
            _BACKENDS[key] = backend
    return backend


def storage_metrics() -> dict[str, float]:
    """This process's storage counters: requests, retries (total and retries_<kind> for throttled,
    server_error, connection_reset, timeout, truncated_body), resumed_reads / resumed_bytes, permanent_errors,
    retries_exhausted, bytes_read, rate_limited_wait_s, backoff_wait_s. Forked workers start at zero; the
    loader sums the workers' snapshots."""
    return METRICS.snapshot()


def reset_storage_metrics() -> None:
    """Zero this process's counters (e.g. at the start of a measured window)."""
    METRICS.reset()
