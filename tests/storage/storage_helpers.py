"""Shared storage-test helpers (also used by benchmarks/bench_storage.py)."""

from __future__ import annotations

# Distinctive fake credentials: the leak tests search every log line, message and repr for them.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDfakeTestKey0001",
    "AWS_SECRET_ACCESS_KEY": "fakeS3SecretValue-0001-do-not-leak",
    "OSS_ACCESS_KEY_ID": "LTAIfakeTestKey0001",
    "OSS_ACCESS_KEY_SECRET": "fakeOssSecretValue-0001-do-not-leak",
    "OSS_SESSION_TOKEN": "fakeStsToken-0001-do-not-leak",
}
BUCKET = "test-bucket"



def raw_s3_client(endpoint: str):
    """A plain boto3 client (uploads and setup only; the code under test never uses it)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def storage_cfg(scheme: str, endpoint: str, **kw):
    """A StorageConfig pointing `scheme` at `endpoint`, with short backoffs so fault tests stay fast."""
    from data.storage import StorageConfig

    base = dict(backoff_base_s=0.005, backoff_max_s=0.05, timeout_s=2.0, connect_timeout_s=2.0, max_retries=10)
    base.update(kw)
    if scheme == "s3":
        return StorageConfig(endpoint_url=endpoint, region="us-east-1", s3_addressing_style="path", **base)
    return StorageConfig(oss_endpoint=endpoint, region="us-east-1", **base)
