"""s3:// through boto3, with our retries, resume, request gate and counters (data/storage_retry.py).

botocore's own retries are switched off (total_max_attempts=1) so every retry is ours: counted, jittered, and
a broken body resumes from the byte where it stopped instead of starting over. `endpoint_url` points the same
code at OSS's S3-compatible endpoint, MinIO, Ceph or a local test server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from data.storage import StorageConfig, split_url
from data.storage_errors import (
    ObjectNotFoundError,
    StorageError,
    install_log_scrubber,
    register_secret,
    scrub,
    scrub_url,
)
from data.storage_retry import Failure, RetryingTransport, RetryPolicy, classify_http, get_gate

_CHUNK = 64 << 10  # a broken body loses at most one chunk: resume starts at the last whole one
LIST_PAGE = 1000  # keys per listing request (the services' maximum)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _classify(exc: BaseException) -> Failure | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code")) if err.get("Code") is not None else None
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = err.get("Message") or ""
        detail = scrub(f"HTTP {status} {code}: {msg}".strip())
        return Failure(classify_http(status, code), status, code, detail)
    return None  # network-level failures are classified from the exception chain by the transport


class S3Storage:
    """S3 (and S3-compatible) objects. Thread-safe; one instance per process and config (get_storage)."""

    def __init__(self, cfg: StorageConfig):
        import boto3
        import botocore.config

        self.cfg = cfg
        region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        bcfg = botocore.config.Config(
            region_name=region,
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.timeout_s,
            # NOTE: retries are ours (counted, resumable); botocore must not retry underneath us.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(cfg.max_in_flight, 1),
            s3={"addressing_style": cfg.s3_addressing_style},
        )
        session = boto3.session.Session()
        creds = session.get_credentials()
        if creds is not None:
            # Credentials from a profile file or an instance role are not in the environment: register them so
            # scrub() removes them from any message or log line.
            frozen = creds.get_frozen_credentials()
            for v in (frozen.access_key, frozen.secret_key, frozen.token):
                register_secret(v)
        self._client = session.client("s3", endpoint_url=cfg.endpoint_url, config=bcfg)
        self._endpoint = self._client.meta.endpoint_url
        install_log_scrubber()
        self._t = RetryingTransport(
            RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s),
            get_gate(cfg.max_in_flight, cfg.max_requests_per_second),
            _classify,
        )

    def __repr__(self) -> str:
        return (
            f"S3Storage(endpoint={scrub_url(self._endpoint)!r}, region={self._client.meta.region_name!r}, "
            f"max_in_flight={self.cfg.max_in_flight}, max_requests_per_second={self.cfg.max_requests_per_second})"
        )

    @staticmethod
    def _split(url: str) -> tuple[str, str]:
        scheme, bucket, key = split_url(url)
        if scheme != "s3":
            raise ValueError(f"S3Storage got a {scheme}:// URL: {url!r}")
        return bucket, key

    def _open_body(self, bucket: str, key: str, whole: bool):
        def open_body(offset: int, end: int | None, etag: str | None) -> tuple[Iterator[bytes], int | None, str]:
            kw: dict = {"Bucket": bucket, "Key": key}
            if not (whole and offset == 0 and end is None):
                kw["Range"] = f"bytes={offset}-{'' if end is None else end}"
            if etag is not None:
                kw["IfMatch"] = etag
            resp = self._client.get_object(**kw)
            total: int | None = None
            m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
            if m and m.group(3) != "*":
                total = int(m.group(3))
            elif "Range" not in kw:
                total = int(resp["ContentLength"])
            body = resp["Body"]

            def chunks() -> Iterator[bytes]:
                # A body that breaks raises after the chunks already yielded: the transport keeps those bytes
                # and resumes from there.
                try:
                    yield from body.iter_chunks(_CHUNK)
                finally:
                    body.close()

            return chunks(), total, resp.get("ETag")

        return open_body

    def read(self, url: str) -> bytes:
        bucket, key = self._split(url)
        return self._t.read_stream(url, 0, None, self._open_body(bucket, key, whole=True))

    def read_range(self, url: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"read_range {url}: start and length must be >= 0, got {start}, {length}")
        if length == 0:
            return b""
        bucket, key = self._split(url)
        return self._t.read_stream(url, start, length, self._open_body(bucket, key, whole=False))

    def list(self, prefix: str) -> list[str]:
        bucket, key = self._split(prefix)
        out: list[str] = []
        token: str | None = None
        while True:
            kw: dict = {"Bucket": bucket, "Prefix": key, "MaxKeys": LIST_PAGE}
            if token:
                kw["ContinuationToken"] = token
            page = self._t.call(prefix, "list", lambda kw=kw: self._client.list_objects_v2(**kw))
            out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
            if not token:
                raise StorageError(f"list {prefix}: truncated listing without a continuation token")
        return sorted(out)

    def _head(self, url: str, missing_ok: bool = False) -> dict:
        bucket, key = self._split(url)
        return self._t.call(url, "head", lambda: self._client.head_object(Bucket=bucket, Key=key), missing_ok)

    def exists(self, url: str) -> bool:
        try:
            self._head(url, missing_ok=True)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, url: str) -> int:
        return int(self._head(url)["ContentLength"])

    def identity(self, url: str) -> str:
        h = self._head(url)
        return f"{str(h['ETag']).strip(chr(34))}-{int(h['ContentLength'])}"
