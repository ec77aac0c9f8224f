"""oss:// through Alibaba Cloud's oss2 client, with our retries, resume, request gate and counters.

Endpoint: StorageConfig.oss_endpoint, else env OSS_ENDPOINT, else https://oss-<region>.aliyuncs.com from
StorageConfig.region / env OSS_REGION. Credentials: env OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET and, for STS
temporary credentials, OSS_SESSION_TOKEN (OSS_SECURITY_TOKEN is accepted too). They are read when the backend
is built (once per process) and never stored in a config, a repr or a message.

oss2 does not retry object requests itself, and its CRC check cannot cover a body we resumed from a range, so
CRC is off and integrity of a stitched body rests on exact lengths plus If-Match on the first ETag.
"""

from __future__ import annotations

import os
import re
import threading
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
    import oss2

    if isinstance(exc, oss2.exceptions.OssError) and exc.status > 0:
        code = exc.code or None
        detail = scrub(f"HTTP {exc.status} {code or ''}: {exc.message or ''}".strip())
        return Failure(classify_http(exc.status, code), exc.status, code, detail)
    # status -2 (RequestError) wraps a requests exception: the transport classifies it from the chain.
    return None


def resolve_oss_endpoint(cfg: StorageConfig) -> str:
    """The OSS endpoint URL from the config, the environment, or the region; ValueError saying what to set."""
    ep = cfg.oss_endpoint or os.environ.get("OSS_ENDPOINT")
    region = cfg.region or os.environ.get("OSS_REGION")
    if not ep and region:
        ep = f"https://oss-{region.removeprefix('oss-')}.aliyuncs.com"
    if not ep:
        raise ValueError(
            "oss:// needs an endpoint: set data.storage.oss_endpoint (e.g. https://oss-cn-hangzhou.aliyuncs.com), "
            "env OSS_ENDPOINT, or a region (data.storage.region / env OSS_REGION)"
        )
    if "://" not in ep:
        ep = "https://" + ep
    return ep


class OssStorage:
    """Alibaba Cloud OSS objects. Thread-safe; one instance per process and config (get_storage)."""

    def __init__(self, cfg: StorageConfig):
        import oss2

        self.cfg = cfg
        self._endpoint = resolve_oss_endpoint(cfg)
        ak = os.environ.get("OSS_ACCESS_KEY_ID")
        sk = os.environ.get("OSS_ACCESS_KEY_SECRET")
        token = os.environ.get("OSS_SESSION_TOKEN") or os.environ.get("OSS_SECURITY_TOKEN")
        if not ak or not sk:
            raise ValueError(
                "oss:// needs credentials in the environment: OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET "
                "(plus OSS_SESSION_TOKEN for STS temporary credentials)"
            )
        for v in (ak, sk, token):
            register_secret(v)
        self._region = cfg.region or os.environ.get("OSS_REGION")
        if cfg.oss_auth_version == "v4":
            if not self._region:
                raise ValueError("data.storage.oss_auth_version='v4' needs data.storage.region (or env OSS_REGION)")
            self._auth = (
                oss2.StsAuth(ak, sk, token, auth_version=oss2.AUTH_VERSION_4) if token else oss2.AuthV4(ak, sk)
            )
        else:
            self._auth = oss2.StsAuth(ak, sk, token) if token else oss2.Auth(ak, sk)
        self._session = oss2.Session(pool_size=max(cfg.max_in_flight, 1))
        self._buckets: dict[str, oss2.Bucket] = {}
        self._lock = threading.Lock()
        install_log_scrubber()
        self._t = RetryingTransport(
            RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s),
            get_gate(cfg.max_in_flight, cfg.max_requests_per_second),
            _classify,
        )

    def __repr__(self) -> str:
        return (
            f"OssStorage(endpoint={scrub_url(self._endpoint)!r}, region={self._region!r}, "
            f"auth={self.cfg.oss_auth_version}, max_in_flight={self.cfg.max_in_flight}, "
            f"max_requests_per_second={self.cfg.max_requests_per_second})"
        )

    def _bucket(self, url: str):
        import oss2

        scheme, bucket, key = split_url(url)
        if scheme != "oss":
            raise ValueError(f"OssStorage got a {scheme}:// URL: {url!r}")
        with self._lock:
            b = self._buckets.get(bucket)
            if b is None:
                b = oss2.Bucket(
                    self._auth,
                    self._endpoint,
                    bucket,
                    session=self._session,
                    # requests accepts (connect, read) timeouts; oss2 passes this through unchanged.
                    connect_timeout=(self.cfg.connect_timeout_s, self.cfg.timeout_s),
                    enable_crc=False,
                    region=self._region,
                )
                self._buckets[bucket] = b
        return b, key

    def _open_body(self, url: str, whole: bool):
        b, key = self._bucket(url)

        def open_body(offset: int, end: int | None, etag: str | None) -> tuple[Iterator[bytes], int | None, str]:
            # "standard" range behaviour: an unsatisfiable range is a 416, not silently the whole object.
            headers = {"x-oss-range-behavior": "standard"}
            if etag is not None:
                headers["If-Match"] = etag
            byte_range = None if (whole and offset == 0 and end is None) else (offset, end)
            res = b.get_object(key, byte_range=byte_range, headers=headers)
            total: int | None = None
            m = _CONTENT_RANGE.match(res.headers.get("Content-Range", "") or "")
            if m and m.group(3) != "*":
                total = int(m.group(3))
            elif byte_range is None and res.content_length is not None:
                total = int(res.content_length)
            tag = res.headers.get("ETag")

            def chunks() -> Iterator[bytes]:
                try:
                    if res.content_length == 0:  # oss2 already drained an empty body (see oss2.Bucket._do)
                        return
                    yield from res.resp.response.iter_content(_CHUNK)
                finally:
                    res.resp.response.close()

            return chunks(), total, tag

        return open_body

    def read(self, url: str) -> bytes:
        return self._t.read_stream(url, 0, None, self._open_body(url, whole=True))

    def read_range(self, url: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"read_range {url}: start and length must be >= 0, got {start}, {length}")
        if length == 0:
            return b""
        return self._t.read_stream(url, start, length, self._open_body(url, whole=False))

    def list(self, prefix: str) -> list[str]:
        b, key = self._bucket(prefix)
        bucket = split_url(prefix)[1]
        out: list[str] = []
        marker = ""
        while True:
            page = self._t.call(
                prefix, "list", lambda m=marker: b.list_objects(prefix=key, marker=m, max_keys=LIST_PAGE)
            )
            out.extend(f"oss://{bucket}/{o.key}" for o in page.object_list)
            if not page.is_truncated:
                break
            if not page.next_marker:
                raise StorageError(f"list {prefix}: truncated listing without a next marker")
            marker = page.next_marker
        return sorted(out)

    def _head(self, url: str, missing_ok: bool = False):
        b, key = self._bucket(url)
        return self._t.call(url, "head", lambda: b.head_object(key), missing_ok)

    def exists(self, url: str) -> bool:
        try:
            self._head(url, missing_ok=True)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, url: str) -> int:
        return int(self._head(url).content_length)

    def identity(self, url: str) -> str:
        h = self._head(url)
        return f"{str(h.etag).strip(chr(34))}-{int(h.content_length)}"
