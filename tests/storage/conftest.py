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
from storage_helpers import BUCKET, FAKE_CREDENTIALS, raw_s3_client  # noqa: E402,F401


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
