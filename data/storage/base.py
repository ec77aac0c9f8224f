"""The storage interface, URL parsing, and what the S3 and OSS backends share.

`ObjectStore` implements the whole `Storage` interface once, on top of three small per-service calls
(`_get`, `_list_page`, `_head`): every request goes through one `RetryingTransport` (data/storage/retry.py),
so retries, ranged-read resume, the request gate and the counters behave the same on every service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from data.storage.config import StorageConfig
from data.storage.errors import ObjectNotFoundError, StorageError, install_log_scrubber, scrub
from data.storage.retry import Failure, RetryingTransport, RetryPolicy, get_gate

# (chunks, total object size if known, ETag) of one GET; the transport resumes a broken body from its offset.
Body = tuple[Iterator[bytes], "int | None", "str | None"]


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


class ObjectStore:
    """Storage over an object service: subclasses give the scheme and the three service calls."""

    scheme = ""
    CHUNK = 64 << 10
    """Body chunk size: a broken body loses at most one chunk (resume starts at the last whole one)."""
    LIST_PAGE = 1000
    """Keys per listing request (the services' maximum)."""
    CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

    def __init__(self, cfg: StorageConfig, classify: Callable[[BaseException], Failure | None]) -> None:
        self.cfg = cfg
        install_log_scrubber()
        self._t = RetryingTransport(
            RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s),
            get_gate(cfg.max_in_flight, cfg.max_requests_per_second),
            classify,
        )

    def _name_endpoint(self, endpoint: str | None, key: str) -> None:
        """What an unreachable-endpoint error names: the endpoint (scrubbed) and the setting that chose it."""
        self._t.endpoint = scrub(endpoint) if endpoint else "the storage endpoint"
        self._t.endpoint_key = key

    # ---------------------------------------------------------------- per service
    def _get(self, bucket: str, key: str, byte_range: tuple[int, int | None] | None, etag: str | None) -> Body:
        """GET the object (byte_range None = whole; (start, end) inclusive, end None = to the end), If-Match
        `etag` when given."""
        raise NotImplementedError

    def _list_page(self, bucket: str, prefix: str, token: str | None) -> tuple[list[str], str | None, bool]:
        """(keys, continuation token, truncated) of one listing page."""
        raise NotImplementedError

    def _head(self, bucket: str, key: str) -> tuple[str, int]:
        """(ETag, size) of an object."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def split(self, url: str) -> tuple[str, str]:
        scheme, bucket, key = split_url(url)
        if scheme != self.scheme:
            raise ValueError(f"{type(self).__name__} got a {scheme}:// URL: {url!r}")
        return bucket, key

    def total_size(self, content_range: str | None, ranged: bool, content_length: int | None) -> int | None:
        """The object's size from a response: Content-Range's total, or the length of a whole-object GET."""
        m = self.CONTENT_RANGE.match(content_range or "")
        if m and m.group(3) != "*":
            return int(m.group(3))
        if not ranged and content_length is not None:
            return int(content_length)
        return None

    def _opener(self, url: str, whole: bool):
        bucket, key = self.split(url)

        def open_body(offset: int, end: int | None, etag: str | None) -> Body:
            rng = None if (whole and offset == 0 and end is None) else (offset, end)
            return self._get(bucket, key, rng, etag)

        return open_body

    def read(self, url: str) -> bytes:
        return self._t.read_stream(url, 0, None, self._opener(url, whole=True))

    def read_range(self, url: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"read_range {url}: start and length must be >= 0, got {start}, {length}")
        if length == 0:
            return b""
        return self._t.read_stream(url, start, length, self._opener(url, whole=False))

    def list(self, prefix: str) -> list[str]:
        bucket, key = self.split(prefix)
        out: list[str] = []
        token: str | None = None
        while True:
            keys, token, truncated = self._t.call(prefix, "list", lambda t=token: self._list_page(bucket, key, t))
            out.extend(f"{self.scheme}://{bucket}/{k}" for k in keys)
            if not truncated:
                break
            if not token:
                raise StorageError(f"list {prefix}: truncated listing without a continuation token")
        return sorted(out)

    def _stat(self, url: str, missing_ok: bool = False) -> tuple[str, int]:
        bucket, key = self.split(url)
        return self._t.call(url, "head", lambda: self._head(bucket, key), missing_ok)

    def exists(self, url: str) -> bool:
        try:
            self._stat(url, missing_ok=True)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, url: str) -> int:
        return self._stat(url)[1]

    def identity(self, url: str) -> str:
        etag, size = self._stat(url)
        return f"{str(etag).strip(chr(34))}-{size}"
