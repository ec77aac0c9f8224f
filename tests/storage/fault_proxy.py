"""A small fault-injecting HTTP proxy for storage tests: it sits between a client (boto3 / oss2) and a real
S3-compatible server (moto) and, by a seeded plan, answers 503 SlowDown bursts or 429s, resets connections in
the middle of a response body, and delays responses (past the client's read timeout, or just slow).

It also records what it saw (request lines, Range headers, peak concurrency) so tests can check that a resumed
read asked for the bytes it was missing and that the client's in-flight cap held.

`oss_dialect=True` removes the S3 XML namespace from response bodies: real OSS answers un-namespaced XML and
oss2's list parser looks elements up without a namespace (and requires the per-object <Type> that OSS always
sends), while moto answers in S3's namespace without <Type>. Object bytes are never changed.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_S3_NS = b' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


@dataclass
class FaultPlan:
    """Probabilities per proxied request (drawn from one seeded RNG, under a lock)."""

    p_503: float = 0.0
    """Chance that a request starts a burst of `burst_len` 503 SlowDown answers."""
    burst_len: int = 3
    p_429: float = 0.0
    p_reset: float = 0.0
    """Chance that a GET with a body of at least `reset_min_body` bytes is cut (TCP RST) mid-body."""
    reset_min_body: int = 64
    p_delay: float = 0.0
    delay_s: float = 0.0
    """Sleep before answering (set above the client's read timeout to force a timeout)."""
    always_status: int | None = None
    """Answer every request with this status (e.g. 503 to exhaust retries, 403 to test permanent errors)."""
    deny_keys: tuple[str, ...] = ()
    """Paths containing one of these substrings get 403 AccessDenied."""
    reset_at_bytes: int | None = None
    """Deterministic variant: cut the FIRST GET whose body is larger than this after exactly this many bytes."""
    cut_with_fin: bool = False
    """End a cut body with a clean close (FIN: the client receives every byte sent, then a short body) instead
    of a TCP reset (RST: the kernel may discard bytes the client has not read yet)."""
    script: tuple[str, ...] = ()
    """Actions for the first requests, in order ("503", "429", "reset", "delay", "ok"); then the random plan.
    Makes sure every kind of fault happens in a short test, whatever the random draws."""
    seed: int = 0


@dataclass
class ProxyStats:
    requests: int = 0
    injected_503: int = 0
    injected_429: int = 0
    injected_resets: int = 0
    injected_delays: int = 0
    injected_403: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    ranges: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    """(path, Range header, If-Match header) of every request."""


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan | None = None, oss_dialect: bool = False):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.plan = plan or FaultPlan()
        self.oss_dialect = oss_dialect
        self.stats = ProxyStats()
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._burst_left = 0
        self._reset_done = False
        self._script = list(self.plan.script)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def finish(self):
                with contextlib.suppress(OSError):
                    super().finish()

            def _any(self):
                proxy._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out and hung up: expected
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- decisions -------------------------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str | None:
        p = self.plan
        with self._lock:
            self.stats.requests += 1
            if p.always_status is not None:
                return f"status:{p.always_status}"
            if any(k in path for k in p.deny_keys):
                self.stats.injected_403 += 1
                return "status:403"
            if self._script:
                a = self._script.pop(0)
                if a in ("503", "429"):
                    setattr(self.stats, f"injected_{a}", getattr(self.stats, f"injected_{a}") + 1)
                    return f"status:{a}"
                if a == "delay":
                    self.stats.injected_delays += 1
                return None if a == "ok" else a
            if self._burst_left > 0:
                self._burst_left -= 1
                self.stats.injected_503 += 1
                return "status:503"
            r = self._rng.random()
            if r < p.p_503:
                self._burst_left = p.burst_len - 1
                self.stats.injected_503 += 1
                return "status:503"
            r -= p.p_503
            if r < p.p_429:
                self.stats.injected_429 += 1
                return "status:429"
            r -= p.p_429
            if r < p.p_delay:
                self.stats.injected_delays += 1
                return "delay"
            r -= p.p_delay
            if r < p.p_reset:
                return "reset"
        return None

    # -- handling --------------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.stats.in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
            self.stats.ranges.append((h.path, h.headers.get("Range"), h.headers.get("If-Match")))
        try:
            self._serve(h)
        finally:
            with self._lock:
                self.stats.in_flight -= 1

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body_in = h.rfile.read(n) if n else b""
        action = self._decide(h.command, h.path)
        if action == "delay":
            time.sleep(self.plan.delay_s)
        if action and action.startswith("status:"):
            self._send_error(h, int(action.split(":")[1]))
            return
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            conn.request(h.command, h.path, body=body_in, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, resp_headers = resp.status, resp.getheaders()
        finally:
            conn.close()
        if self.oss_dialect and _S3_NS in data:
            data = data.replace(_S3_NS, b"")
            if b"<Contents>" in data and b"<Type>" not in data:
                data = data.replace(b"</ETag>", b"</ETag><Type>Normal</Type>")
        cut = None
        if h.command == "GET" and data:
            with self._lock:
                at = self.plan.reset_at_bytes
                if at is not None and not self._reset_done and len(data) > at:
                    self._reset_done = True
                    cut = self.plan.reset_at_bytes
                    self.stats.injected_resets += 1
                elif action == "reset" and len(data) >= self.plan.reset_min_body:
                    cut = self._rng.randrange(1, len(data))
                    self.stats.injected_resets += 1
        h.send_response_only(status)
        for k, v in resp_headers:
            if k.lower() in _HOP or k.lower() == "content-length":
                continue
            h.send_header(k, v)
        if h.command == "HEAD":
            cl = dict((k.lower(), v) for k, v in resp_headers).get("content-length", "0")
            h.send_header("Content-Length", cl)
        else:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            h.wfile.flush()
            return
        if cut is None:
            h.wfile.write(data)
            h.wfile.flush()
            return
        # Part of the body, then a TCP reset (SO_LINGER 0 makes close() send RST instead of FIN) or a clean close.
        h.wfile.write(data[:cut])
        h.wfile.flush()
        if self.plan.cut_with_fin:
            h.connection.shutdown(socket.SHUT_WR)
        else:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True

    def _send_error(self, h: BaseHTTPRequestHandler, status: int) -> None:
        code = {503: "SlowDown", 429: "TooManyRequests", 403: "AccessDenied"}.get(status, "InternalError")
        msg = {503: "Please reduce your request rate.", 403: "Access Denied"}.get(status, "injected fault")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
            f"<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        h.send_response_only(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(body)))
        h.send_header("x-oss-request-id", "fault-proxy")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
        h.wfile.flush()
