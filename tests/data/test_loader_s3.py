"""The loader over s3:// (a real S3-compatible server, moto, on 127.0.0.1): the same microbatches as from the
local copy, with DataLoader workers and through a resume; shards listed without a manifest; indexed text."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from datahelpers import assert_same_batches, damaged_dataset, mixed_samples, take, write_dataset

from data.config import DataConfig, DatasetSpec
from data.indexed import write_indexed
from data.loader import build_loader
from data.shards import MANIFEST
from data.storage import StorageConfig

BUCKET = "data-tests"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("s3src")
    local = write_dataset(root / "chat", mixed_samples(30, seed=5), per_shard=7)
    rng = np.random.default_rng(1)
    write_indexed(str(root / "text"), [rng.integers(0, 5000, size=int(rng.integers(3, 40))) for _ in range(40)])
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            key = os.path.relpath(path, root)
            client.upload_file(path, BUCKET, key)
            if f.endswith(".tar") or f.endswith(".index.json"):
                client.upload_file(path, BUCKET, "nomanifest/" + os.path.relpath(path, os.path.join(root, "chat")))
    yield endpoint, str(root), local
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _storage(endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, region="us-east-1", s3_addressing_style="path", timeout_s=5.0)


def _cfg(tok_dir, endpoint, chat, text, **kw) -> DataConfig:
    base = dict(datasets=[DatasetSpec(chat, weight=2.0, name="chat"),
                          DatasetSpec(text, kind="indexed", name="text")],
                tokenizer=tok_dir, max_tokens=320, max_pixels=64 * 28 * 28, shuffle_buffer=6, pack_buffer=5,
                num_workers=2, epochs=1, read_chunk_bytes=8192, storage=_storage(endpoint))
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.timeout(240)
def test_s3_equals_local_with_workers_and_resume(s3, tok_dir):
    endpoint, root, local = s3
    from_local = list(build_loader(_cfg(tok_dir, endpoint, local, os.path.join(root, "text")), 0, 1))
    cfg = _cfg(tok_dir, endpoint, f"s3://{BUCKET}/chat", f"s3://{BUCKET}/text")
    remote = build_loader(cfg, 0, 1)
    head = []
    for b in remote:
        head.append(b)
        if len(head) == 4:
            break
    state = remote.state_dict()
    remote.close()
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    from_s3 = head + list(resumed)
    assert len(from_s3) == len(from_local) and sum(len(b.sample_keys) for b in from_s3) == 70
    for a, b in zip(from_local, from_s3):
        assert a.sample_keys == b.sample_keys
        assert all(torch.equal(x, getattr(b, k)) for k, x in a.as_dict().items() if isinstance(x, torch.Tensor))
    # The workers' storage counters reach the loader's metrics.
    m = resumed.metrics()
    assert m["storage/requests"] > 0 and m["storage/bytes_read"] > 0


def test_s3_shards_without_manifest_are_listed(s3, tok_dir):
    endpoint, _, local = s3
    assert not os.path.exists(os.path.join(f"{local}", "nomanifest", MANIFEST))
    cfg = DataConfig(datasets=[DatasetSpec(f"s3://{BUCKET}/nomanifest")], tokenizer=tok_dir, num_workers=0,
                     epochs=1, max_tokens=320, max_pixels=64 * 28 * 28, storage=_storage(endpoint))
    keys = [k for b in build_loader(cfg, 0, 1) for k in b.sample_keys]
    assert len(keys) == len(set(keys)) == 30


@pytest.mark.timeout(240)
def test_s3_damaged_shards_are_skipped_like_local_ones(s3, tok_dir, tmp_path):
    """A truncated object, a missing and a stale sidecar index on s3://: the same counted skips (bad_shard) and
    the same microbatches as from the local copy, with workers and through a resume (before: the job died)."""
    import boto3

    endpoint, _, _ = s3
    local, good, _ = damaged_dataset(tmp_path / "ds")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in os.listdir(local):
        client.upload_file(os.path.join(local, f), BUCKET, f"damaged/ds/{f}")
    kw = dict(tokenizer=tok_dir, max_tokens=256, shuffle_buffer=4, pack_buffer=4, num_workers=2, epochs=2,
              max_bad_shard_fraction=0.5, storage=_storage(endpoint))
    from_local = list(build_loader(DataConfig(datasets=[DatasetSpec(local)], **kw), 0, 1))
    cfg = DataConfig(datasets=[DatasetSpec(f"s3://{BUCKET}/damaged/ds")], **kw)
    remote = build_loader(cfg, 0, 1)
    head = take(remote, 3)
    state = remote.state_dict()
    remote.close()
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(head + list(resumed), from_local)
    assert {k.rsplit("/", 1)[-1] for b in from_local for k in b.sample_keys} == good
    assert resumed.metrics()["skipped/bad_shard"] == 2 * 15 and resumed.metrics()["bad_shards"] == 3
