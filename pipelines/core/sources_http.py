"""HTTP(S) fetching for URI lists: timeouts, bounded retries with backoff, a per-host limit, a size cap.

Built on requests with urllib3's ``Retry``: connection errors, read timeouts before the headers,
429 and 5xx are retried with exponential backoff; 404 and other 4xx are not. Every failure is
raised as ``RecordError("read", reason)`` with a short reason and no body bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .config import HttpConfig
from .errors import RecordError

RETRY_STATUSES = (429, 500, 502, 503, 504)
BACKOFF_S = 0.5  # urllib3 waits BACKOFF_S * 2**(n-1) before retry n >= 2 (the first retry is immediate)
BACKOFF_MAX_S = 10.0
RETRY_AFTER_MAX_S = 30.0  # a server's Retry-After is obeyed, but never for longer than this
CHUNK_BYTES = 1 << 16


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


class _CappedRetry(Retry):
    """``Retry`` that will not sleep for hours because a server asked it to."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), RETRY_AFTER_MAX_S)


def _retry(retries: int) -> Retry:
    return _CappedRetry(
        total=retries,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=BACKOFF_S,
        backoff_max=BACKOFF_MAX_S,
        raise_on_status=False,  # after the last retry, hand back the 5xx so that we can name it
    )


# One semaphore per (host, limit) for the whole process, so that units read at the same time in
# several threads share each host's budget. Keyed by the limit too, so a differently sized limit
# never borrows a semaphore of the wrong size.
_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextmanager
def host_slot(url: str, limit: int) -> Iterator[None]:
    """Hold one of the ``limit`` concurrent request slots of ``url``'s host (host:port)."""
    key = (urlsplit(url).netloc.lower(), limit)
    with _slots_lock:
        slot = _slots.get(key)
        if slot is None:
            slot = _slots[key] = threading.BoundedSemaphore(limit)
    with slot:
        yield


class HttpFetcher:
    """GETs whole bodies into memory, up to ``max_bytes``. Safe to share between threads."""

    def __init__(self, http: HttpConfig):
        self.http = http
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=_retry(http.retries), pool_maxsize=max(http.per_host, 10))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def get(self, url: str) -> bytes:
        with host_slot(url, self.http.per_host):
            return self._get(url)

    def _get(self, url: str) -> bytes:
        # requests applies the read timeout to each socket read, not to the whole body; the
        # max_bytes cap is what bounds memory.
        timeout = (self.http.timeout_s, self.http.timeout_s)
        try:
            with self.session.get(url, stream=True, timeout=timeout) as response:
                if not 200 <= response.status_code < 300:
                    raise RecordError("read", f"HTTP {response.status_code}")
                return _read_body(response, self.http.max_bytes)
        except requests.RequestException as exc:
            raise RecordError("read", _reason(exc)) from exc


def _read_body(response: requests.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    body = bytearray()
    # The cap is checked while streaming too: a body may come without Content-Length, or be
    # compressed and grow when decoded.
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    return bytes(body)


def _reason(exc: requests.RequestException) -> str:
    """A short reason; urllib3 wraps the last cause of a retried request in MaxRetryError."""
    cause = exc.args[0] if exc.args else None
    inner = getattr(cause, "reason", cause)
    if isinstance(inner, urllib3.exceptions.NewConnectionError):  # a subclass of the timeouts, oddly
        return f"connection failed ({type(inner).__name__})"
    if isinstance(exc, requests.Timeout) or isinstance(inner, urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(exc, requests.ConnectionError) and isinstance(inner, Exception):
        return f"connection failed ({type(inner).__name__})"
    return f"{type(exc).__name__}: {str(exc)[:150]}"
