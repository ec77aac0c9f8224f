"""s3:// through boto3, with our retries, resume, request gate and counters (data/storage/base.py, retry.py).

botocore's own retries are switched off (total_max_attempts=1) so every retry is ours: counted, jittered, and
a broken body resumes from the byte where it stopped instead of starting over. `endpoint_url` points the same
code at OSS's S3-compatible endpoint, MinIO, Ceph or a local test server.
"""

from __future__ import annotations

import logging
import os

from data.storage.base import Body, ObjectStore
from data.storage.config import StorageConfig
from data.storage.errors import register_secret, scrub, scrub_url
from data.storage.retry import Failure, classify_http


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


class S3Storage(ObjectStore):
    """S3 (and S3-compatible) objects. Thread-safe; one instance per process and config (get_storage)."""

    scheme = "s3"

    def __init__(self, cfg: StorageConfig):
        import boto3
        import botocore.config

        super().__init__(cfg, _classify)
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
        # "Found credentials in environment variables" at INFO in every process would bury the run's own lines.
        cred_log = logging.getLogger("botocore.credentials")
        if cred_log.level == logging.NOTSET:
            cred_log.setLevel(logging.WARNING)
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
        self._name_endpoint(self._endpoint, "data.storage.endpoint_url" if cfg.endpoint_url else
                            "data.storage.endpoint_url (unset: boto3's default or env AWS_ENDPOINT_URL)")

    def __repr__(self) -> str:
        return (
            f"S3Storage(endpoint={scrub_url(self._endpoint)!r}, region={self._client.meta.region_name!r}, "
            f"max_in_flight={self.cfg.max_in_flight}, max_requests_per_second={self.cfg.max_requests_per_second})"
        )

    def _get(self, bucket: str, key: str, byte_range: tuple[int, int | None] | None, etag: str | None) -> Body:
        kw: dict = {"Bucket": bucket, "Key": key}
        if byte_range is not None:
            start, end = byte_range
            kw["Range"] = f"bytes={start}-{'' if end is None else end}"
        if etag is not None:
            kw["IfMatch"] = etag
        resp = self._client.get_object(**kw)
        total = self.total_size(resp.get("ContentRange"), byte_range is not None, resp.get("ContentLength"))
        body = resp["Body"]

        def chunks():
            # A body that breaks raises after the chunks already yielded: the transport keeps those bytes and
            # resumes from there.
            try:
                yield from body.iter_chunks(self.CHUNK)
            finally:
                body.close()

        return chunks(), total, resp.get("ETag")

    def _list_page(self, bucket: str, prefix: str, token: str | None) -> tuple[list[str], str | None, bool]:
        kw: dict = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.LIST_PAGE}
        if token:
            kw["ContinuationToken"] = token
        page = self._client.list_objects_v2(**kw)
        keys = [o["Key"] for o in page.get("Contents", [])]
        return keys, page.get("NextContinuationToken"), bool(page.get("IsTruncated"))

    def _head(self, bucket: str, key: str) -> tuple[str, int]:
        h = self._client.head_object(Bucket=bucket, Key=key)
        return str(h["ETag"]), int(h["ContentLength"])
