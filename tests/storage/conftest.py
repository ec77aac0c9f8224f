"""Storage test fixtures: a real S3-compatible server (moto's ThreadedMotoServer on 127.0.0.1, free port),
fake credentials in the environment, and the fault-injecting proxy (fault_proxy.py) in front of the server."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fault_proxy import FaultPlan, FaultProxy  # noqa: E402

# Distinctive fake credentials: the leak tests search every log line, message and repr for them.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDfakeTestKey0001",
    "AWS_SECRET_ACCESS_KEY": "fakeS3SecretValue-0001-do-not-leak",
    "OSS_ACCESS_KEY_ID": "LTAIfakeTestKey0001",
    "OSS_ACCESS_KEY_SECRET": "fakeOssSecretValue-0001-do-not-leak",
    "OSS_SESSION_TOKEN": "fakeStsToken-0001-do-not-leak",
}
BUCKET = "test-bucket"


@pytest.fixture(scope="session")
def fake_credentials():
    old = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield dict(FAKE_CREDENTIALS)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto_endpoint(fake_credentials):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = raw_s3_client(endpoint)
    s3.create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def raw_s3_client(endpoint: str):
    """A plain boto3 client (uploads and setup only; the code under test never uses it)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_admin(moto_endpoint):
    return raw_s3_client(moto_endpoint)


@pytest.fixture
def make_proxy(moto_endpoint):
    proxies: list[FaultProxy] = []

    def make(plan: FaultPlan | None = None, oss_dialect: bool = False) -> FaultProxy:
        p = FaultProxy(moto_endpoint, plan, oss_dialect=oss_dialect)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


def storage_cfg(scheme: str, endpoint: str, **kw):
    """A StorageConfig pointing `scheme` at `endpoint`, with short backoffs so fault tests stay fast."""
    from data.storage import StorageConfig

    base = dict(backoff_base_s=0.005, backoff_max_s=0.05, timeout_s=2.0, connect_timeout_s=2.0, max_retries=10)
    base.update(kw)
    if scheme == "s3":
        return StorageConfig(endpoint_url=endpoint, region="us-east-1", s3_addressing_style="path", **base)
    return StorageConfig(oss_endpoint=endpoint, region="us-east-1", **base)
