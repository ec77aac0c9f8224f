"""One small storage interface for local paths, s3:// and oss:// URLs.

Everything the loader reads (shards, their sidecar indexes, media referenced by URL) goes through
`get_storage(url, cfg).read(...)` / `.read_range(...)`. Backends:

    local paths, file://   LocalStorage (here)
    s3://bucket/key        S3Storage (data/storage_s3.py, boto3; `endpoint_url` makes OSS's S3-compatible
                           endpoint, MinIO, Ceph or a local test server work)
    oss://bucket/key       OssStorage (data/storage_oss.py, oss2; endpoint/region from the recipe or the
                           environment, credentials from OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET /
                           OSS_SESSION_TOKEN)

The object-store backends retry throttling (503 / SlowDown / 429), connection resets, timeouts and truncated
bodies with exponential backoff and jitter; a broken ranged read resumes where it stopped (If-Match the first
ETag); requests in flight and requests per second are capped per process; permanent errors (403, NoSuchKey)
raise at once with the URL in the message and never the credentials (data/storage_retry.py,
data/storage_errors.py). `storage_metrics()` returns this process's retry counters for the loader to report.
See docs/storage_video.md.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from data.storage_errors import (
    ObjectChangedError,
    ObjectNotFoundError,
    StorageAccessDenied,
    StorageError,
    StorageRetriesExhausted,
    scrub,
)
from data.storage_retry import METRICS

__all__ = [
    "StorageConfig",
    "Storage",
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
    "scrub",
]


@dataclass
class StorageConfig:
    """Object-store settings (recipe `data.storage`). There are deliberately no credential fields: credentials
    come from the environment (or the clients' own credential chains) so a saved config never holds them."""

    endpoint_url: str | None = None
    """S3 endpoint for s3:// URLs (e.g. https://oss-cn-hangzhou.aliyuncs.com for OSS's S3-compatible API, a
    MinIO server, or a local test server); None = boto3's default (AWS, or env AWS_ENDPOINT_URL)."""
    region: str | None = None
    """Region name: for S3 request signing, and for OSS (builds the endpoint when `oss_endpoint` is unset;
    required by V4 signing). None = env AWS_REGION / OSS_REGION."""
    oss_endpoint: str | None = None
    """OSS endpoint for oss:// URLs, e.g. https://oss-cn-hangzhou-internal.aliyuncs.com. None = env
    OSS_ENDPOINT, else derived from the region (https://oss-<region>.aliyuncs.com)."""
    oss_auth_version: str = "v1"
    """OSS request signing: "v1" (works everywhere, and against S3-compatible test servers) or "v4"
    (needs `region`)."""
    s3_addressing_style: str = "auto"
    """S3 bucket addressing: "auto", "path" (bucket in the path; local servers) or "virtual" (bucket in the
    host name; required by OSS's S3-compatible endpoint)."""
    max_retries: int = 8
    """Retries per request on throttling / transient errors before giving up. A resumed read that made
    progress starts a fresh count."""
    backoff_base_s: float = 0.1
    """First backoff ceiling in seconds; doubles per retry (throttling starts 4x higher); full jitter."""
    backoff_max_s: float = 20.0
    """Largest backoff ceiling in seconds."""
    max_in_flight: int = 16
    """Requests in flight per process (each DataLoader worker is a process)."""
    max_requests_per_second: float = 0.0
    """Per-process request-rate cap; 0 = unlimited. For a bucket QPS limit Q shared by R ranks with W workers
    each, use about Q / (R * (W + 1))."""
    timeout_s: float = 60.0
    """Read timeout per request (seconds without a byte from the server)."""
    connect_timeout_s: float = 10.0
    """Connect timeout per request."""

    def __post_init__(self) -> None:
        if self.oss_auth_version not in ("v1", "v4"):
            raise ValueError(f"storage.oss_auth_version must be 'v1' or 'v4', got {self.oss_auth_version!r}")
        if self.s3_addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(
                f"storage.s3_addressing_style must be 'auto', 'path' or 'virtual', got {self.s3_addressing_style!r}"
            )
        if self.max_retries < 0:
            raise ValueError(f"storage.max_retries must be >= 0, got {self.max_retries}")
        if self.max_in_flight < 1:
            raise ValueError(f"storage.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_requests_per_second < 0:
            raise ValueError(
                f"storage.max_requests_per_second must be >= 0 (0 = unlimited), got {self.max_requests_per_second}"
            )
        for name in ("timeout_s", "connect_timeout_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"storage.{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_base_s < 0:
            raise ValueError(f"storage.backoff_base_s must be >= 0, got {self.backoff_base_s}")
        for name in ("endpoint_url", "oss_endpoint"):
            v = getattr(self, name)
            if v is not None and scrub(v) != v:
                raise ValueError(
                    f"storage.{name} must not carry credentials (got {scrub(v)}); put them in the environment"
                )


@runtime_checkable
class Storage(Protocol):
    def read(self, url: str) -> bytes:
        """The whole object."""
        ...

    def read_range(self, url: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start` (raises if the object is shorter)."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Sorted full URLs of the objects under `prefix` (a directory or a key prefix)."""
        ...

    def exists(self, url: str) -> bool: ...

    def size(self, url: str) -> int: ...

    def identity(self, url: str) -> str:
        """A string that changes whenever the object's bytes change (ETag; size+mtime locally)."""
        ...


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b'); raises ValueError naming the URL when malformed."""
    if "://" not in url:
        raise ValueError(f"not an object-store URL: {url!r}")
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} has no bucket name (expected {scheme}://bucket/key)")
    return scheme, bucket, key


class LocalStorage:
    """Plain files. Paths may be given with or without a file:// prefix."""

    @staticmethod
    def _path(url: str) -> str:
        return url[len("file://") :] if url.startswith("file://") else url

    def _open(self, url: str):
        try:
            return open(self._path(url), "rb")
        except FileNotFoundError:
            raise ObjectNotFoundError(f"read {url}: no such file") from None
        except PermissionError:
            raise StorageAccessDenied(f"read {url}: permission denied") from None

    def read(self, url: str) -> bytes:
        with self._open(url) as f:
            data = f.read()
        METRICS.add(bytes_read=len(data))
        return data

    def read_range(self, url: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"read_range {url}: start and length must be >= 0, got {start}, {length}")
        with self._open(url) as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise StorageError(f"short read from {url}: wanted {length} bytes at {start}, got {len(data)}")
        METRICS.add(bytes_read=len(data))
        return data

    def list(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        if os.path.isdir(p):
            return sorted(os.path.join(p, n) for n in os.listdir(p))
        d, base = os.path.split(p)
        if d and not os.path.isdir(d):
            return []
        return sorted(os.path.join(d, n) for n in os.listdir(d or ".") if n.startswith(base))

    def exists(self, url: str) -> bool:
        return os.path.exists(self._path(url))

    def size(self, url: str) -> int:
        try:
            return os.path.getsize(self._path(url))
        except FileNotFoundError:
            raise ObjectNotFoundError(f"size {url}: no such file") from None

    def identity(self, url: str) -> str:
        try:
            st = os.stat(self._path(url))
        except FileNotFoundError:
            raise ObjectNotFoundError(f"identity {url}: no such file") from None
        return f"{st.st_size}-{st.st_mtime_ns}"

    def __repr__(self) -> str:
        return "LocalStorage()"


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
                from data.storage_s3 import S3Storage

                backend = S3Storage(cfg)
            elif scheme == "oss":
                from data.storage_oss import OssStorage

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
