"""Plain files (local paths and file:// URLs) behind the Storage interface."""

from __future__ import annotations

import os

from data.storage.errors import ObjectNotFoundError, StorageAccessDenied, StorageError
from data.storage.retry import METRICS


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
