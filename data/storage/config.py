"""Object-store settings of a recipe (`data.storage`): endpoints, signing, retry budget, request caps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data.storage.errors import scrub


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
    oss_auth_version: Literal["v1", "v4"] = "v1"
    """OSS request signing: "v1" (works everywhere, and against S3-compatible test servers) or "v4"
    (needs `region`)."""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
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
