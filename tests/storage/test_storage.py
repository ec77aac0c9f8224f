"""Storage backends against a real S3-compatible server (moto) and the fault-injecting proxy.

s3:// goes through boto3, oss:// through oss2 with V1 signing; both hit the same moto bucket. The fault tests
check bytes (every read equals what was uploaded) and counters (the retries the proxy provoked are counted).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from urllib.parse import unquote

import pytest
from fault_proxy import FaultPlan
from storage_helpers import BUCKET, FAKE_CREDENTIALS, storage_cfg

from data.storage import (
    LocalStorage,
    ObjectNotFoundError,
    StorageAccessDenied,
    StorageConfig,
    StorageRetriesExhausted,
    get_storage,
    reset_storage_metrics,
    storage_metrics,
)
from data.storage.base import ObjectStore
from data.storage.errors import scrub
from data.storage.oss import OssStorage
from data.storage.retry import RequestGate
from data.storage.s3 import S3Storage

SCHEMES = ["s3", "oss"]


@pytest.fixture(scope="module")
def objects(s3_admin):
    """Uploaded once: a few shard-sized blobs of random bytes, an empty object, a nested prefix."""
    rng = __import__("random").Random(0)
    blobs = {f"objs/blob{i}.bin": rng.randbytes(150_000 + 37_000 * i) for i in range(4)}
    blobs["objs/empty.bin"] = b""
    blobs["objs/sub/x.bin"] = b"hello"
    for k, v in blobs.items():
        s3_admin.put_object(Bucket=BUCKET, Key=k, Body=v)
    return blobs


def _backend(scheme, proxy, **kw):
    return get_storage(f"{scheme}://{BUCKET}/", storage_cfg(scheme, proxy.endpoint, **kw))


def test_local_storage(tmp_path):
    st = get_storage(str(tmp_path / "a.bin"))
    assert isinstance(st, LocalStorage)
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "ab.bin").write_bytes(b"x")
    assert st.read(str(tmp_path / "a.bin")) == b"0123456789"
    assert st.read_range("file://" + str(tmp_path / "a.bin"), 3, 4) == b"3456"
    assert st.list(str(tmp_path)) == [str(tmp_path / "a.bin"), str(tmp_path / "ab.bin")]
    assert st.list(str(tmp_path / "ab")) == [str(tmp_path / "ab.bin")]
    assert st.exists(str(tmp_path / "a.bin")) and not st.exists(str(tmp_path / "zz"))
    assert st.size(str(tmp_path / "a.bin")) == 10
    ident = st.identity(str(tmp_path / "a.bin"))
    time.sleep(0.01)
    (tmp_path / "a.bin").write_bytes(b"0123456789!")
    assert st.identity(str(tmp_path / "a.bin")) != ident
    with pytest.raises(ObjectNotFoundError, match="zz"):
        st.read(str(tmp_path / "zz"))
    with pytest.raises(OSError, match="short read"):
        st.read_range(str(tmp_path / "a.bin"), 5, 100)


def test_unknown_scheme_and_bad_config():
    with pytest.raises(ValueError, match="gs"):
        get_storage("gs://b/k")
    with pytest.raises(ValueError, match="oss_auth_version"):
        StorageConfig(oss_auth_version="v3")
    with pytest.raises(ValueError, match="credentials"):
        StorageConfig(endpoint_url="http://user:pw@host:9000")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_object_store_api(scheme, objects, s3_admin, make_proxy, monkeypatch):
    """read / read_range / list (paged) / exists / size / identity, with no faults."""
    px = make_proxy(oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px)
    for key, data in objects.items():
        url = f"{scheme}://{BUCKET}/{key}"
        assert st.read(url) == data
        assert st.size(url) == len(data)
        assert st.exists(url)
        if len(data) > 1000:
            assert st.read_range(url, 123, 777) == data[123:900]
            assert st.read_range(url, len(data) - 10, 10) == data[-10:]
        assert st.read_range(url, 0, 0) == b""
    assert not st.exists(f"{scheme}://{BUCKET}/objs/missing.bin")
    # Listing pages: a small page size forces several requests and continuation tokens / markers.
    monkeypatch.setattr(S3Storage if scheme == "s3" else OssStorage, "LIST_PAGE", 2)
    expect = sorted(f"{scheme}://{BUCKET}/{k}" for k in objects)
    assert st.list(f"{scheme}://{BUCKET}/objs/") == expect
    assert st.list(f"{scheme}://{BUCKET}/objs/sub") == [f"{scheme}://{BUCKET}/objs/sub/x.bin"]
    # identity changes when the bytes change
    key = f"changing/{scheme}.bin"
    s3_admin.put_object(Bucket=BUCKET, Key=key, Body=b"v1")
    a = st.identity(f"{scheme}://{BUCKET}/{key}")
    s3_admin.put_object(Bucket=BUCKET, Key=key, Body=b"v2")
    assert st.identity(f"{scheme}://{BUCKET}/{key}") != a
    with pytest.raises(OSError, match="past the end"):
        st.read_range(f"{scheme}://{BUCKET}/objs/blob0.bin", len(objects["objs/blob0.bin"]) - 5, 10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reads_survive_faults_and_are_counted(scheme, objects, make_proxy):
    """503 bursts, 429s, resets mid-body and delays past the read timeout: every byte arrives intact and the
    counters show each kind of retry."""
    plan = FaultPlan(
        p_503=0.08, burst_len=3, p_429=0.05, p_reset=0.3, p_delay=0.04, delay_s=0.8, seed=3,
        script=("503", "ok", "reset", "429", "delay", "ok", "reset"),
    )
    px = make_proxy(plan, oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px, timeout_s=0.5)
    reset_storage_metrics()
    big = [k for k, v in objects.items() if len(v) > 100_000]
    for _ in range(3):
        for key in big:
            url = f"{scheme}://{BUCKET}/{key}"
            data = objects[key]
            assert st.read(url) == data
            assert st.read_range(url, 5000, 120_000) == data[5000:125_000]
    m = storage_metrics()
    s = px.stats
    assert s.injected_503 > 0 and s.injected_429 > 0 and s.injected_resets > 0 and s.injected_delays > 0
    assert m["retries_throttled"] == s.injected_503 + s.injected_429
    # Each injected reset and each delay past the read timeout costs exactly one retry (a reset can show up as
    # a timeout when a loaded server was slow before the cut), plus timeouts nobody injected on a busy machine.
    broken = m["retries_truncated_body"] + m["retries_connection_reset"] + m["retries_timeout"]
    assert broken >= s.injected_resets + s.injected_delays, (m, s)
    assert m["retries_truncated_body"] + m["retries_connection_reset"] >= 1 and m["retries_timeout"] >= 1
    assert m["resumed_reads"] >= 1 and m["resumed_bytes"] > 0, m
    assert m["retries"] == sum(v for k, v in m.items() if k.startswith("retries_") and k != "retries_exhausted")
    assert m["permanent_errors"] == 0 and m["retries_exhausted"] == 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_broken_body_resumes_where_it_stopped(scheme, objects, make_proxy):
    """A body cut after exactly 200,000 bytes: the retry asks only for the rest (from the last whole chunk
    that arrived) with If-Match on the first ETag, and the bytes are stitched correctly."""
    key = "objs/blob3.bin"
    data = objects[key]
    chunk = ObjectStore.CHUNK  # one chunk size for both services (the shared base)
    assert S3Storage.CHUNK == OssStorage.CHUNK == chunk
    px = make_proxy(FaultPlan(reset_at_bytes=200_000, cut_with_fin=True), oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px)
    reset_storage_metrics()
    assert st.read(f"{scheme}://{BUCKET}/{key}") == data
    reqs = [(r, m) for p, r, m in px.stats.ranges if key in unquote(p)]
    assert len(reqs) == 2 and reqs[0] == (None, None), px.stats.ranges
    # The retry starts at the first byte the client did not keep: 200,000 when the client library hands over
    # the short last chunk (botocore), or the last whole chunk boundary when it drops it (requests/urllib3).
    resumed_from = int(reqs[1][0].split("=")[1].split("-")[0])
    assert 200_000 - chunk < resumed_from <= 200_000 and reqs[1][0].endswith(f"-{len(data) - 1}"), reqs
    assert reqs[1][1] and reqs[1][1].strip('"') == st.identity(f"{scheme}://{BUCKET}/{key}").rsplit("-", 1)[0]
    m = storage_metrics()
    assert m["resumed_bytes"] == resumed_from and m["retries_truncated_body"] == 1 and m["retries"] == 1
    # Same for a ranged read: the resumed range starts inside the original range and ends where it ended.
    px2 = make_proxy(FaultPlan(reset_at_bytes=150_000, cut_with_fin=True), oss_dialect=(scheme == "oss"))
    st2 = _backend(scheme, px2)
    assert st2.read_range(f"{scheme}://{BUCKET}/{key}", 1000, 200_000) == data[1000:201_000]
    r = [r for p, r, _ in px2.stats.ranges if key in unquote(p)]
    assert len(r) == 2 and r[0] == "bytes=1000-200999" and r[1].endswith("-200999"), r
    assert 1000 + 150_000 - chunk < int(r[1].split("=")[1].split("-")[0]) <= 151_000, r


@pytest.mark.parametrize("scheme", SCHEMES)
def test_permanent_errors_are_not_retried(scheme, objects, make_proxy):
    px = make_proxy(FaultPlan(deny_keys=("secret-dir",)), oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px)
    reset_storage_metrics()
    url = f"{scheme}://{BUCKET}/objs/no-such-key.bin"
    with pytest.raises(ObjectNotFoundError) as ei:
        st.read(url)
    assert url in str(ei.value) and "NoSuchKey" in str(ei.value)
    denied = f"{scheme}://{BUCKET}/secret-dir/x.bin"
    with pytest.raises(StorageAccessDenied) as ei:
        st.read_range(denied, 0, 10)
    assert denied in str(ei.value) and "403" in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__
    m = storage_metrics()
    assert m["retries"] == 0 and m["permanent_errors"] == 2 and m["requests"] == 2
    assert px.stats.requests == 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_retries_exhausted_is_a_clear_error(scheme, objects, make_proxy):
    px = make_proxy(FaultPlan(always_status=503), oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px, max_retries=3)
    url = f"{scheme}://{BUCKET}/objs/blob0.bin"
    with pytest.raises(StorageRetriesExhausted, match="4 attempts.*throttled"):
        st.read(url)
    assert px.stats.requests == 4


def test_in_flight_cap_and_rate_cap(objects, make_proxy):
    """max_in_flight bounds concurrent requests seen by the server; max_requests_per_second bounds the rate."""
    px = make_proxy(FaultPlan(p_delay=1.0, delay_s=0.05))
    st = _backend("s3", px, max_in_flight=2)
    url = f"s3://{BUCKET}/objs/sub/x.bin"
    threads = [threading.Thread(target=lambda: [st.read(url) for _ in range(3)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert px.stats.requests == 18 and px.stats.peak_in_flight == 2

    px2 = make_proxy()
    st2 = _backend("s3", px2, max_requests_per_second=10.0)
    reset_storage_metrics()
    t0 = time.monotonic()
    for _ in range(16):
        st2.exists(url)
    # A bucket of 10 tokens refilling at 10/s: 16 requests need at least (16 - 10) / 10 = 0.6 s.
    assert time.monotonic() - t0 >= 0.6 * 0.95
    assert storage_metrics()["rate_limited_wait_s"] > 0


def test_request_gate_rate_is_capped_across_threads():
    """The token bucket alone (no I/O): 4 threads x 50 requests at 200/s with a burst of 200 take >= 0.25 s,
    and no 1-second window holds more than burst + rate starts."""
    gate = RequestGate(max_in_flight=4, rps=200.0)
    starts: list[float] = []
    lock = threading.Lock()

    def work():
        for _ in range(100):
            with gate, lock:
                starts.append(time.monotonic())

    t0 = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= (400 - 200) / 200 * 0.95
    starts.sort()
    j = 0
    for i, t in enumerate(starts):
        while starts[j] < t - 1.0:
            j += 1
        assert i - j + 1 <= 200 + 200 + 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_credentials_never_leak(scheme, objects, make_proxy, caplog):
    """DEBUG logs of boto3/oss2 (oss2 logs request headers, incl. the STS token), error messages, reprs and
    the config dict never contain a credential."""
    px = make_proxy(FaultPlan(deny_keys=("denied",), p_503=0.3, seed=1), oss_dialect=(scheme == "oss"))
    st = _backend(scheme, px)
    texts = [repr(st), str(dataclasses.asdict(st.cfg))]
    with caplog.at_level(logging.DEBUG):
        st.read(f"{scheme}://{BUCKET}/objs/sub/x.bin")
        for url in (f"{scheme}://{BUCKET}/denied/x", f"{scheme}://{BUCKET}/objs/none"):
            try:
                st.read(url)
            except OSError as e:
                texts.append(str(e))
                texts.append(repr(e))
    assert len(caplog.records) > 5  # the clients did log at DEBUG
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    for secret in FAKE_CREDENTIALS.values():
        assert secret not in blob, f"credential {secret[:6]}... leaked"
    assert "do-not-leak" not in blob


def test_scrub_patterns():
    s = scrub(
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA123%2F2024&X-Amz-Signature=abcdef "
        "Authorization: OSS LTAIabc:sig+/= https://user:pw@host/x headers={'x-oss-security-token': 'tok123'}"
    )
    for bad in ("AKIA123", "abcdef", "LTAIabc:sig", "user:pw", "tok123"):
        assert bad not in s, s


def test_forked_worker_gets_fresh_client_and_counters(objects, make_proxy):
    """A DataLoader worker is a forked process: it must build its own client and start its counters at zero."""
    px = make_proxy()
    st = _backend("s3", px)
    url = f"s3://{BUCKET}/objs/blob0.bin"
    st.read(url)
    assert storage_metrics()["requests"] >= 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            before = storage_metrics()["requests"]
            st2 = _backend("s3", px)
            ok = st2 is not st and st2.read(url) == objects["objs/blob0.bin"]
            os.write(w, f"{int(ok)} {before} {storage_metrics()['requests']}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode().split()
    os.waitpid(pid, 0)
    assert out == ["1", "0", "1"], out


# ------------------------------------------------------------------------------------------ unreachable endpoint
def _closed_port() -> int:
    """A local port with nothing listening (bound, then released: connecting to it is refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unreachable_endpoint_says_connection_refused_naming_it(scheme, fake_credentials):
    """Before: after the retries, 'gave up after 9 attempts, last failure connection_reset: EndpointConnectionError
    ... (raise data.storage.max_retries or lower the request rate)', under a 37-line traceback."""
    from data.storage import StorageUnreachable

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    st = get_storage(f"{scheme}://{BUCKET}/", storage_cfg(scheme, endpoint, max_retries=2))
    for call in (lambda: st.list(f"{scheme}://{BUCKET}/ds/"), lambda: st.read(f"{scheme}://{BUCKET}/ds/x.json")):
        with pytest.raises(StorageUnreachable) as ei:
            call()
        msg = str(ei.value)
        assert f"cannot connect to {endpoint}" in msg and "connection refused" in msg, msg
        assert "request rate" not in msg and "\n" not in msg and "3 attempts" in msg
        assert f"data.storage.{'endpoint_url' if scheme == 's3' else 'oss_endpoint'}" in msg
        assert isinstance(ei.value, StorageRetriesExhausted)  # still what the loader treats as "not the shard's fault"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tool", ["train", "data.inspect"])
def test_unreachable_endpoint_is_one_line_exit_2(tool, fake_credentials, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import qwen_tokenizer_dir

    repo = Path(__file__).resolve().parents[2]
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    data = [f"data.datasets=[{{path: s3://{BUCKET}/ds}}]", f"data.storage.endpoint_url={endpoint}",
            "data.storage.max_retries=2", f"data.tokenizer={qwen_tokenizer_dir()}"]
    if tool == "train":
        cmd = ["-m", "train", str(repo / "recipes/tiny/stage3.yaml"), f"run_dir={tmp_path / 'run'}",
               "model.init_from=null", *data]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"data:\n  datasets: [{{path: 's3://{BUCKET}/ds'}}]\n"
                          f"  storage: {{endpoint_url: '{endpoint}', max_retries: 2}}\n")
        cmd = ["-m", "data.inspect", "--data", str(recipe), "--tokenizer", str(qwen_tokenizer_dir())]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, *cmd], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x
             and not re.search(r"\bWARNING\b", x)]  # log lines (one says it is retrying) are not the error
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"cannot connect to {endpoint}" in lines[0] and "connection refused" in lines[0], lines[0]
