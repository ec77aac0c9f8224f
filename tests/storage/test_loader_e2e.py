"""End to end through the REAL loader: shards made by `python -m data.shards make` (chat samples with real
images and H.264 videos), uploaded to the moto bucket, streamed by data.loader.build_loader over s3:// (boto3)
and oss:// (oss2) with the fault proxy in the path (503 bursts, 429s, resets mid-body, delays past the read
timeout). Every sample arrives exactly once, in the same order and with the same tensors as a fault-free run
from the local copy, and the loader's metrics show the retries its DataLoader workers made."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from fault_proxy import FaultPlan
from PIL import Image
from storage_helpers import BUCKET, storage_cfg

from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.shards.__main__ import main as shards_main
from data.storage import reset_storage_metrics, storage_metrics


def _clip(n: int, w: int = 96, h: int = 64) -> bytes:
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            fr = np.zeros((h, w, 3), np.uint8)
            fr[:, (i * 7) % w :] = (40 * i) % 255
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_admin):
    """~30 chat samples (text, images from scikit-image, videos), 4 per shard; local copy + uploaded copy."""
    from skimage import data as skd

    root = tmp_path_factory.mktemp("e2e")
    media = root / "media"
    media.mkdir()
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    for i, p in enumerate(photos):
        Image.fromarray(p).resize((96 + 16 * i, 80)).save(media / f"img{i}.png")
    for i in range(2):
        (media / f"clip{i}.mp4").write_bytes(_clip(20 + 10 * i))
    lines = []
    for i in range(30):
        content: list = []
        if i % 3 == 0:
            content.append({"type": "image", "image": f"img{i % 4}.png"})
        if i % 7 == 3:
            content.append({"type": "video", "video": f"clip{i % 2}.mp4"})
        content.append({"type": "text", "text": f"Sample {i}: describe " + "word " * (i % 11)})
        lines.append({"id": f"s{i:03d}", "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": f"Answer number {i}."},
        ]})
    (root / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = root / "ds"
    assert shards_main(["make", "--input", str(root / "in.jsonl"), "--media", str(media), "--out", str(out),
                        "--samples-per-shard", "4"]) == 0
    files = sorted(os.listdir(out))
    assert sum(f.endswith(".tar") for f in files) == 8
    for f in files:
        s3_admin.upload_file(str(out / f), BUCKET, f"e2e/ds/{f}")
    return str(out)


def _run(tokenizer_dir, path, storage=None):
    kw = {} if storage is None else {"storage": storage}
    cfg = DataConfig(datasets=[DatasetSpec(path)], tokenizer=str(tokenizer_dir), max_tokens=1024,
                     num_workers=2, epochs=1, seed=3, shuffle_buffer=5, pack_buffer=4,
                     read_chunk_bytes=4096, **kw)  # small chunks: many ranged reads per shard
    reset_storage_metrics()
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    m = loader.metrics()
    loader.close()
    # The loader sums its workers' counters; the manifest and indexes read in this (main) process are counted
    # here.
    for k, v in storage_metrics().items():
        m[f"storage/{k}"] = m.get(f"storage/{k}", 0) + v
    return batches, m


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["s3", "oss"])
def test_loader_over_object_store_with_faults(scheme, dataset, make_proxy, tokenizer_dir):
    ref, ref_m = _run(tokenizer_dir, dataset)
    ref_keys = [k for b in ref for k in b.sample_keys]
    assert len(ref_keys) == 30 and len(set(ref_keys)) == 30, (len(ref_keys), ref_m)
    assert ref_m["videos"] == 4 and ref_m["images"] == 10 and ref_m["skipped"] == 0, ref_m

    plan = FaultPlan(p_503=0.06, burst_len=2, p_429=0.03, p_reset=0.15, p_delay=0.02, delay_s=0.8, seed=11,
                     script=("503", "ok", "429", "reset", "delay", "ok", "reset"))
    px = make_proxy(plan, oss_dialect=(scheme == "oss"))
    got, m = _run(tokenizer_dir, f"{scheme}://{BUCKET}/e2e/ds",
                  storage_cfg(scheme, px.endpoint, timeout_s=0.5, max_retries=12))
    keys = [k for b in got for k in b.sample_keys]
    assert keys == ref_keys  # every sample exactly once, same order
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        for name, v in a.as_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, getattr(b, name)), name
    s = px.stats
    assert s.injected_503 + s.injected_429 > 0 and s.injected_resets > 0 and s.injected_delays > 0
    assert m["storage/retries"] >= s.injected_503 + s.injected_429, (m, s)
    assert m["storage/retries_throttled"] == s.injected_503 + s.injected_429
    assert m["storage/retries_truncated_body"] + m["storage/retries_connection_reset"] >= 1
    assert m["storage/retries_timeout"] >= 1 and m["storage/permanent_errors"] == 0
    assert m["skipped"] == 0 and m["videos"] == 4
