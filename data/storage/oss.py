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
import threading

from data.storage.base import Body, ObjectStore
from data.storage.config import StorageConfig
from data.storage.errors import register_secret, scrub, scrub_url
from data.storage.retry import Failure, classify_http


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


class OssStorage(ObjectStore):
    """Alibaba Cloud OSS objects. Thread-safe; one instance per process and config (get_storage)."""

    scheme = "oss"

    def __init__(self, cfg: StorageConfig):
        import oss2

        super().__init__(cfg, _classify)
        self._endpoint = resolve_oss_endpoint(cfg)
        self._name_endpoint(self._endpoint, "data.storage.oss_endpoint" if cfg.oss_endpoint else
                            "data.storage.oss_endpoint (unset: env OSS_ENDPOINT or the region)")
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

    def __repr__(self) -> str:
        return (
            f"OssStorage(endpoint={scrub_url(self._endpoint)!r}, region={self._region!r}, "
            f"auth={self.cfg.oss_auth_version}, max_in_flight={self.cfg.max_in_flight}, "
            f"max_requests_per_second={self.cfg.max_requests_per_second})"
        )

    def _bucket(self, bucket: str):
        import oss2

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
        return b

    def _get(self, bucket: str, key: str, byte_range: tuple[int, int | None] | None, etag: str | None) -> Body:
        # "standard" range behaviour: an unsatisfiable range is a 416, not silently the whole object.
        headers = {"x-oss-range-behavior": "standard"}
        if etag is not None:
            headers["If-Match"] = etag
        res = self._bucket(bucket).get_object(key, byte_range=byte_range, headers=headers)
        total = self.total_size(res.headers.get("Content-Range"), byte_range is not None, res.content_length)

        def chunks():
            try:
                if res.content_length == 0:  # oss2 already drained an empty body (see oss2.Bucket._do)
                    return
                yield from res.resp.response.iter_content(self.CHUNK)
            finally:
                res.resp.response.close()

        return chunks(), total, res.headers.get("ETag")

    def _list_page(self, bucket: str, prefix: str, token: str | None) -> tuple[list[str], str | None, bool]:
        page = self._bucket(bucket).list_objects(prefix=prefix, marker=token or "", max_keys=self.LIST_PAGE)
        return [o.key for o in page.object_list], page.next_marker or None, bool(page.is_truncated)

    def _head(self, bucket: str, key: str) -> tuple[str, int]:
        h = self._bucket(bucket).head_object(key)
        return str(h.etag), int(h.content_length)
