"""One small storage interface for local paths, s3:// and oss:// URLs.

Everything the loader reads (shards, their sidecar indexes, media referenced by URL) goes through
`get_storage(url).read(...)`. Backends: local files here; s3 (boto3) and oss (oss2) with retries, rate
limits and bounded concurrency are added by the object-storage work (see docs/storage_video.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol


@dataclass
class StorageConfig:
    """Object-store settings (recipe `data.storage`); credentials come from the environment only."""

    endpoint_url: str | None = None
    """S3 endpoint (e.g. an OSS S3-compatible endpoint or a local server); None = AWS default."""
    region: str | None = None
    """Region name for S3 / OSS."""
    oss_endpoint: str | None = None
    """OSS endpoint for oss:// URLs (or env OSS_ENDPOINT)."""
    max_retries: int = 8
    """Retries on throttling / transient errors before giving up."""
    max_in_flight: int = 16
    """Requests in flight per process."""
    max_requests_per_second: float = 0.0
    """Per-process request-rate cap; 0 = unlimited."""
    timeout_s: float = 60.0
    """Connect/read timeout per request."""


class Storage(Protocol):
    def read(self, url: str) -> bytes: ...
    def read_range(self, url: str, start: int, length: int) -> bytes: ...
    def list(self, prefix: str) -> list[str]: ...
    def exists(self, url: str) -> bool: ...
    def size(self, url: str) -> int: ...
    def identity(self, url: str) -> str:
        """A string that changes whenever the object's bytes change (ETag; size+mtime locally)."""
        ...


class LocalStorage:
    """Plain files. Paths may be given with or without a file:// prefix."""

    @staticmethod
    def _path(url: str) -> str:
        return url[len("file://") :] if url.startswith("file://") else url

    def read(self, url: str) -> bytes:
        with open(self._path(url), "rb") as f:
            return f.read()

    def read_range(self, url: str, start: int, length: int) -> bytes:
        with open(self._path(url), "rb") as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise OSError(f"short read from {url}: wanted {length} bytes at {start}, got {len(data)}")
        return data

    def list(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        if os.path.isdir(p):
            return sorted(os.path.join(p, n) for n in os.listdir(p))
        d, base = os.path.split(p)
        return sorted(os.path.join(d, n) for n in os.listdir(d or ".") if n.startswith(base))

    def exists(self, url: str) -> bool:
        return os.path.exists(self._path(url))

    def size(self, url: str) -> int:
        return os.path.getsize(self._path(url))

    def identity(self, url: str) -> str:
        st = os.stat(self._path(url))
        return f"{st.st_size}-{st.st_mtime_ns}"


_LOCAL = LocalStorage()


def get_storage(url: str, cfg: StorageConfig | None = None) -> Storage:
    """The backend for a URL's scheme."""
    if "://" not in url or url.startswith("file://"):
        return _LOCAL
    scheme = url.split("://", 1)[0]
    raise ValueError(f"unsupported storage scheme {scheme!r} in {url!r} (supported: local paths, file://)")
