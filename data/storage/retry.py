"""Retries, request gating and counters shared by the object-store backends (data/storage/s3.py, oss.py).

Why this layer owns retries instead of botocore / oss2: both clients retry (or not) with their own budgets and
never tell us, so a loader could not report how often a bucket throttled it, and neither resumes a ranged
read whose body broke half way. Here every request goes through `RetryingTransport.call` (one request) or
`RetryingTransport.read_stream` (a byte range whose body may break), which

  * classify each failure as transient (throttled, server error, connection reset, timeout, truncated body)
    or permanent (not found, access denied, bad request): permanent ones raise at once, never retried;
  * back off exponentially with full jitter (AWS architecture blog "Exponential Backoff And Jitter"), longer
    after throttling than after a reset, so a thousand ranks that were throttled together do not retry in
    lock step;
  * bound the requests in flight per process (a semaphore) and the request rate per process (a token bucket);
  * count everything in one per-process `StorageMetrics`, read through `data.storage.storage_metrics()`.

Process model: DataLoader workers are forked; `os.register_at_fork` resets the counters, gates and client
caches in the child, so a worker never inherits a lock held by a parent thread or a parent's HTTP pool.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from data.storage.errors import (
    ObjectChangedError,
    ObjectNotFoundError,
    StorageAccessDenied,
    StorageError,
    StorageRetriesExhausted,
    StorageUnreachable,
    scrub,
)

log = logging.getLogger("data.storage")

T = TypeVar("T")

# Failure kinds. Transient kinds are retried; the rest raise at once.
THROTTLED = "throttled"  # 429, 503, SlowDown, RequestLimitExceeded, ...
SERVER = "server_error"  # other 5xx, InternalError
RESET = "connection_reset"  # reset / refused / closed mid-request
TIMEOUT = "timeout"  # connect or read timeout
TRUNCATED = "truncated_body"  # body shorter than announced, or broken mid-stream
TRANSIENT_KINDS = (THROTTLED, SERVER, RESET, TIMEOUT, TRUNCATED)
NOT_FOUND = "not_found"
DENIED = "access_denied"
CHANGED = "object_changed"  # If-Match failed while resuming: the object was replaced under us
PERMANENT = "permanent"

THROTTLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "RequestThrottled",
        "BandwidthLimitExceeded",
        "QpsLimitExceeded",
    }
)
SERVER_CODES = frozenset({"InternalError", "RequestTimeout", "RequestTimeTooSkewed", "OperationAborted"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403", "InvalidSecurityToken"}
)


@dataclass(frozen=True)
class Failure:
    """One classified failure: `kind` is one of the constants above; `detail` is already scrubbed."""

    kind: str
    status: int | None
    code: str | None
    detail: str
    unreachable: str | None = None
    """Set when the endpoint could not be connected to at all (see `unreachable()`)."""

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


def classify_http(status: int | None, code: str | None) -> str:
    """Kind of an HTTP error answer (status and the service's error code)."""
    if code in THROTTLE_CODES or status in (429, 503):
        return THROTTLED
    if code in NOT_FOUND_CODES or status == 404:
        return NOT_FOUND
    if code in DENIED_CODES or status in (401, 403):
        return DENIED
    if code == "PreconditionFailed" or status == 412:
        return CHANGED
    if code in SERVER_CODES or (status is not None and status >= 500):
        return SERVER
    return PERMANENT


def classify_network(exc: BaseException) -> str | None:
    """Kind of a network-level exception anywhere in the cause chain, or None if it is none of ours.

    Checked by type name as well as isinstance so that urllib3 / botocore / requests wrappers are recognised
    without importing all three here.
    """
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, socket.timeout | TimeoutError) or names & {
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "ReadTimeout",
            "ConnectTimeout",
            "Timeout",
        }:
            return TIMEOUT
        if isinstance(e, http.client.IncompleteRead) or names & {
            "IncompleteReadError",
            "IncompleteRead",
            "ResponseStreamingError",
            "ChunkedEncodingError",
            "ContentDecodingError",
            "InconsistentError",  # oss2 CRC mismatch: the body we got is not the object
        }:
            return TRUNCATED
        if isinstance(e, ConnectionError | http.client.HTTPException) or names & {
            "ProtocolError",
            "EndpointConnectionError",
            "ConnectionClosedError",
            "ConnectionError",
            "NewConnectionError",
            "MaxRetryError",
            "RemoteDisconnected",
        }:
            return RESET
        e = e.__cause__ or e.__context__
        seen += 1
    return None


# How connection failures read in the exception chains of urllib3 / botocore / requests (Linux and macOS texts).
_REFUSED = ("connection refused", "errno 111", "errno 61", "econnrefused")
_UNRESOLVED = ("name or service not known", "nodename nor servname", "temporary failure in name resolution",
               "no address associated with hostname", "getaddrinfo failed", "errno -2", "errno -3", "errno 8")


def unreachable(exc: BaseException) -> str | None:
    """'connection refused' or 'host name does not resolve' when the exception chain says the endpoint could not
    be connected to at all (a wrong endpoint, or the service is down), else None."""
    seen, todo = 0, [exc]
    while todo and seen < 12:
        e = todo.pop(0)
        seen += 1
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "host name does not resolve"
        text = str(e).lower()
        if any(m in text for m in _REFUSED):
            return "connection refused"
        if any(m in text for m in _UNRESOLVED):
            return "host name does not resolve"
        # requests / urllib3 wrap the socket error as an argument (MaxRetryError.reason) as well as a cause
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ()))
                 if isinstance(c, BaseException)]
    return None


class StorageMetrics:
    """Per-process counters (thread-safe). `snapshot()` is what `data.storage.storage_metrics()` returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.retries_by_kind: dict[str, int] = {k: 0 for k in TRANSIENT_KINDS}
        self.resumed_reads = 0
        self.resumed_bytes = 0
        self.permanent_errors = 0
        self.exhausted = 0
        self.bytes_read = 0
        self.rate_limited_wait_s = 0.0
        self.backoff_wait_s = 0.0

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def add_retry(self, kind: str, wait_s: float) -> None:
        with self._lock:
            self.retries += 1
            self.retries_by_kind[kind] = self.retries_by_kind.get(kind, 0) + 1
            self.backoff_wait_s += wait_s

    def snapshot(self) -> dict[str, float]:
        """Flat dict (loader metrics and wandb want flat keys): retries_<kind> for each transient kind."""
        with self._lock:
            out: dict[str, float] = {
                "requests": self.requests,
                "retries": self.retries,
                "resumed_reads": self.resumed_reads,
                "resumed_bytes": self.resumed_bytes,
                "permanent_errors": self.permanent_errors,
                "retries_exhausted": self.exhausted,
                "bytes_read": self.bytes_read,
                "rate_limited_wait_s": round(self.rate_limited_wait_s, 6),
                "backoff_wait_s": round(self.backoff_wait_s, 6),
            }
            for k, v in self.retries_by_kind.items():
                out[f"retries_{k}"] = v
            return out


METRICS = StorageMetrics()


class RequestGate:
    """At most `max_in_flight` requests at once and at most `rps` request starts per second (token bucket with
    a burst of max(1, rps) tokens), per process. rps <= 0 disables the rate cap."""

    def __init__(self, max_in_flight: int, rps: float) -> None:
        self._sem = threading.BoundedSemaphore(max_in_flight)
        self._rps = float(rps)
        self._burst = max(1.0, self._rps)
        self._tokens = self._burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def _take_token(self) -> None:
        if self._rps <= 0:
            return
        waited = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rps)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    break
                wait = (1.0 - self._tokens) / self._rps
            time.sleep(wait)
            waited += wait
        if waited:
            METRICS.add(rate_limited_wait_s=waited)

    def __enter__(self) -> RequestGate:
        self._sem.acquire()
        try:
            self._take_token()
        except BaseException:
            self._sem.release()
            raise
        METRICS.add(requests=1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._sem.release()


_GATES: dict[tuple[int, float], RequestGate] = {}
_GATES_LOCK = threading.Lock()


def get_gate(max_in_flight: int, rps: float) -> RequestGate:
    """The process-wide gate for these limits (one per process, shared by every backend that uses them)."""
    key = (int(max_in_flight), float(rps))
    with _GATES_LOCK:
        if key not in _GATES:
            _GATES[key] = RequestGate(*key)
        return _GATES[key]


def _reset_after_fork() -> None:
    global _GATES_LOCK
    _GATES_LOCK = threading.Lock()
    _GATES.clear()
    METRICS.reset()


os.register_at_fork(after_in_child=_reset_after_fork)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base_s: float
    max_s: float

    def backoff(self, attempt: int, kind: str) -> float:
        """Full jitter: uniform(0, min(max, base * 2**attempt)); throttling starts 4x higher because the bucket
        asked us to slow down, a reset usually does not need to."""
        base = self.base_s * (4.0 if kind == THROTTLED else 1.0)
        return random.uniform(0.0, min(self.max_s, base * (2.0**attempt)))


def _raise_permanent(url: str, op: str, f: Failure, missing_ok: bool = False) -> None:
    if not (missing_ok and f.kind == NOT_FOUND):  # exists() asking about a missing object is not an error
        METRICS.add(permanent_errors=1)
    msg = f"{op} {url}: {f.detail}"
    if f.kind == NOT_FOUND:
        raise ObjectNotFoundError(msg) from None
    if f.kind == DENIED:
        raise StorageAccessDenied(msg + " (check the credentials in the environment and the bucket policy)") from None
    if f.kind == CHANGED:
        raise ObjectChangedError(msg + " (the object was replaced while it was being read)") from None
    raise StorageError(msg) from None


class RetryingTransport:
    """Runs one backend's requests under the policy, the gate and the counters.

    `classify(exc) -> Failure | None` is the backend's: it maps its client's exceptions (None = not a storage
    failure: a bug, re-raised untouched).
    """

    def __init__(self, policy: RetryPolicy, gate: RequestGate, classify: Callable[[BaseException], Failure | None],
                 endpoint: str = "the storage endpoint", endpoint_key: str = "data.storage.endpoint_url"):
        self.policy = policy
        self.gate = gate
        self.classify = classify
        self.endpoint = endpoint  # scrubbed; what an unreachable-endpoint error names, with the setting behind it
        self.endpoint_key = endpoint_key
        self._warned_unreachable = False

    def _failure(self, exc: BaseException) -> Failure | None:
        f = self.classify(exc)
        if f is None:
            kind = classify_network(exc)
            if kind is not None:
                f = Failure(kind, None, None, scrub(f"{type(exc).__name__}: {exc}"), unreachable(exc))
        return f

    def _wait(self, url: str, op: str, attempt: int, f: Failure) -> None:
        if f.unreachable and not self._warned_unreachable:
            # Retried (a service restarting refuses connections for a moment), but say so at once: a wrong
            # endpoint would otherwise look like a silent hang for the whole retry budget.
            self._warned_unreachable = True
            log.warning("cannot connect to %s (%s); retrying up to %d times", self.endpoint, f.unreachable,
                        self.policy.max_retries)
        if attempt >= self.policy.max_retries:
            METRICS.add(exhausted=1)
            if f.unreachable:
                raise StorageUnreachable(
                    f"{op} {url}: cannot connect to {self.endpoint}: {f.unreachable} ({attempt + 1} attempts); check "
                    f"{self.endpoint_key} and that the service is running there"
                ) from None
            raise StorageRetriesExhausted(
                f"{op} {url}: gave up after {attempt + 1} attempts, last failure {f.kind}: {f.detail} "
                f"(raise data.storage.max_retries or lower the request rate)"
            ) from None
        wait = self.policy.backoff(attempt, f.kind)
        METRICS.add_retry(f.kind, wait)
        log.debug("retrying %s %s after %s (attempt %d, sleeping %.3fs)", op, url, f.kind, attempt + 1, wait)
        time.sleep(wait)

    def call(self, url: str, op: str, fn: Callable[[], T], missing_ok: bool = False) -> T:
        """One request (head, list page, small get) with retries; permanent failures raise at once.
        `missing_ok`: a 404 is an answer (exists()), not counted as a permanent error."""
        attempt = 0
        while True:
            try:
                with self.gate:
                    return fn()
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below, unknown ones re-raised
                f = self._failure(exc)
                if f is None:
                    raise
                if not f.transient:
                    _raise_permanent(url, op, f, missing_ok)
                self._wait(url, op, attempt, f)
                attempt += 1

    def read_stream(
        self,
        url: str,
        start: int,
        length: int | None,
        open_body: Callable[[int, int | None, str | None], tuple[Iterator[bytes], int | None, str | None]],
    ) -> bytes:
        """Bytes [start, start+length) (length None = to the end), resuming where a broken body stopped.

        `open_body(offset, end_inclusive_or_None, if_match_etag)` starts one GET and returns (chunk iterator,
        total object size if known, etag). The first response's ETag is sent as If-Match on every resume, so
        a body is never stitched together from two versions of an object. Attempts are counted per failure
        streak: a resume that made progress starts a new streak, so a long body over a flaky link completes.
        """
        buf = bytearray()
        etag: str | None = None
        end = None if length is None else start + length  # exclusive
        attempt = 0
        resumed = False
        while end is None or start + len(buf) < end:
            got_before = len(buf)
            try:
                with self.gate:
                    offset = start + len(buf)
                    chunks, total, tag = open_body(offset, None if end is None else end - 1, etag)
                    etag = etag or tag
                    if end is None and total is not None:
                        end = total
                    elif end is not None and total is not None and end > total:
                        raise StorageError(
                            f"read {url}: range [{start}, {end}) is past the end of the object ({total} bytes)"
                        )
                    for chunk in chunks:
                        buf += chunk
                    METRICS.add(bytes_read=len(buf) - got_before)
                if resumed:
                    METRICS.add(resumed_reads=1, resumed_bytes=got_before)
                    resumed = False
                if end is None:  # size unknown and the body ended cleanly: that is the object
                    break
                if start + len(buf) < end:
                    # Clean end of a short body (a proxy or server closed after a partial response).
                    raise _ShortBody(f"body ended at byte {start + len(buf)} of {end}")
                if start + len(buf) > end:
                    raise StorageError(f"read {url}: server sent {start + len(buf) - end} bytes beyond the range")
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001
                if len(buf) > got_before:
                    METRICS.add(bytes_read=len(buf) - got_before)
                f = (
                    Failure(TRUNCATED, None, None, str(exc))
                    if isinstance(exc, _ShortBody)
                    else self._failure(exc)
                )
                if f is None:
                    raise
                if not f.transient:
                    _raise_permanent(url, "read", f)
                if len(buf) > got_before:
                    attempt = 0  # progress: a new failure streak
                self._wait(url, "read", attempt, f)
                attempt += 1
                resumed = True
        return bytes(buf)


class _ShortBody(Exception):
    pass
