"""Storage errors and credential scrubbing.

Errors name the URL, the operation and the service's answer (status, code), never credentials. Credentials
can leak through four doors, each closed here:

  1. exception messages: every message we build passes through `scrub`, and client exceptions are never
     chained (`raise ... from None`), because oss2 errors carry request headers and signatures;
  2. logs: `install_log_scrubber()` filters the records of our logger and of botocore / boto3 / urllib3 /
     oss2 (oss2 logs request headers, including `x-oss-security-token`, at DEBUG);
  3. reprs: backends print only scheme, endpoint (userinfo removed) and limits;
  4. saved configs: `StorageConfig` has no credential fields; credentials come from the environment only.
"""

from __future__ import annotations

import logging
import os
import re
import threading

# Environment variables whose values are secrets (or identify a key) in any client we use.
CREDENTIAL_ENV_VARS = (
    "OSS_ACCESS_KEY_ID",
    "OSS_ACCESS_KEY_SECRET",
    "OSS_SESSION_TOKEN",
    "OSS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
REDACTED = "***"


class StorageError(OSError):
    """A storage request failed permanently (or after all retries). The message names the URL."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """404 / NoSuchKey / NoSuchBucket / a missing local file."""


class StorageAccessDenied(StorageError, PermissionError):
    """403 / AccessDenied / bad signature or key: not retried."""


class ObjectChangedError(StorageError):
    """The object changed (ETag mismatch) between the first byte and a resumed range of one read."""


class StorageRetriesExhausted(StorageError):
    """A transient failure (throttling, resets, timeouts) persisted past `max_retries`."""


class StorageUnreachable(StorageRetriesExhausted):
    """Every attempt failed to connect: the endpoint refused the connection (nothing listens there) or its host
    name does not resolve. The message names the endpoint and the setting that points at it."""


_extra_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Patterns that carry credentials whatever their value: signed-URL query parameters, Authorization headers
# ("AWS4-HMAC-SHA256 Credential=AKID/..., Signature=...", "OSS AKID:sig"), security-token headers, and URL
# userinfo (https://user:pass@host).
_PATTERNS = [
    (
        re.compile(
            r"(?i)((?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|ossaccesskeyid|"
            r"security-token|x-oss-signature|x-oss-credential|x-oss-security-token)=)[^&\s'\",]+"
        ),
        r"\1" + REDACTED,
    ),
    (
        re.compile(r"(?i)(['\"]?(?:authorization|x-amz-security-token|x-oss-security-token)['\"]?\s*[:=]\s*b?['\"]?)"
                   r"[^'\"\n]+"),
        r"\1" + REDACTED,
    ),
    (re.compile(r"(?i)\b(Credential=)[^,\s]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(Signature=)[^,\s&]+"), r"\1" + REDACTED),
    (re.compile(r"\b(OSS\s+)[^\s'\":,]+:[^\s'\",]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@"), r"\1" + REDACTED + "@"),
]


def register_secret(value: str | None) -> None:
    """Scrub this value from every message from now on (credentials resolved by a client, e.g. from a
    profile file, that are not in the environment). Values shorter than 4 characters are ignored."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _extra_secrets.add(value)


def _secrets() -> list[str]:
    vals = [os.environ.get(k) for k in CREDENTIAL_ENV_VARS]
    with _secrets_lock:
        out = {v for v in vals if v and len(v) >= 4} | _extra_secrets
    # Longest first so a secret containing another is removed whole.
    return sorted(out, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with known credential values and credential-bearing fields replaced by ***."""
    for s in _secrets():
        if s in text:
            text = text.replace(s, REDACTED)
    for pat, rep in _PATTERNS:
        text = pat.sub(rep, text)
    return text


def scrub_url(url: str | None) -> str | None:
    """An endpoint URL with userinfo and signed-query parameters removed (for reprs and error messages)."""
    return None if url is None else scrub(url)


class ScrubFilter(logging.Filter):
    """Formats the record's message, scrubs it, and stores the result so no handler sees the raw args."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the caller's bug; do not lose the log line
            msg = str(record.msg)
        clean = scrub(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


_FILTER = ScrubFilter()
_SCRUBBED_ROOTS = ("data.storage", "botocore", "boto3", "s3transfer", "urllib3", "oss2", "requests")


def install_log_scrubber() -> None:
    """Attach the scrub filter to our logger and to every existing logger of the storage clients.

    Logger filters apply only to records created on that exact logger, so each child logger (e.g.
    botocore.endpoint, oss2.http) gets one; called again after a client import creates new loggers.
    """
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _SCRUBBED_ROOTS]
    for name in set(names) | set(_SCRUBBED_ROOTS):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
