"""HTTP(S) fetching for URI lists, which are scraped by others: refuse what a list must not reach.

* Only ``http`` and ``https``, without credentials in the URL. The host is resolved once and every
  address it resolves to must be public: loopback, link-local (169.254/16, fe80::/10), private
  (RFC 1918, fc00::/7), CGNAT (100.64/10), multicast, unspecified and reserved addresses are
  refused, and so are metadata host names (``metadata.google.internal``, ...). An operator with
  an internal mirror opts in with ``http.allow_networks`` (CIDRs).
* The connection goes to the address that was checked (the Host header and the TLS server name
  stay the host's), so DNS rebinding cannot swap it. Redirects are followed here, at most 5, each
  hop checked like the first.
* One deadline per attempt covers resolving, connecting, the headers, every redirect and the whole
  body: a server that trickles one byte a second is cut off at the deadline.
* Connection errors, timeouts before the headers, 429 and 5xx are retried (``retries``, with
  backoff, a server's Retry-After obeyed up to 30 s); other 4xx are not. Bodies over ``max_bytes``
  are refused while they stream.

Every failure is ``RecordError("read", reason)`` with a short reason and no body bytes.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from .config import HttpConfig
from .errors import RecordError
from .roots import is_http  # noqa: F401 - where callers have always found it

RETRY_STATUSES = (429, 500, 502, 503, 504)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
BACKOFF_S = 0.5  # retry n waits BACKOFF_S * 2**(n-1)
BACKOFF_MAX_S = 10.0
RETRY_AFTER_MAX_S = 30.0  # a server's Retry-After is obeyed, but never for longer than this
CHUNK_BYTES = 1 << 16
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
CGNAT = ipaddress.ip_network("100.64.0.0/10")
USER_AGENT = "faceaudit (auditing openly shared face data sets)"
_resolver = ThreadPoolExecutor(8, thread_name_prefix="faceaudit-dns")


class _Retryable(RecordError):
    """A failure worth another attempt (the connection, a 429 or a 5xx)."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__("read", reason)
        self.wait_s = wait_s


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: where to connect (``address``) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    path: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Reachable on the public internet: not loopback, link-local, private, CGNAT, multicast,
    unspecified or reserved (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return False
    return address.is_global and not address.is_multicast


def check_url(url: str, allow: list[str], deadline: float) -> Target:
    """The URL's target once its scheme, host and every address it resolves to pass; else refused."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RecordError("read", "only http and https URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise RecordError("read", "URLs with credentials are not fetched")
    try:
        host, port = (parts.hostname or "").rstrip("."), parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise RecordError("read", "bad port in URL") from None
    if not host:
        raise RecordError("read", "URL without a host")
    if host in METADATA_HOSTS or host.endswith(".internal"):
        raise RecordError("read", "refused: a metadata or internal host name")
    addresses = _resolve(host, port, deadline)
    networks = [ipaddress.ip_network(n, strict=False) for n in allow]
    for address in addresses:
        if not is_public(address) and not any(address in net for net in networks):
            raise RecordError("read", "refused: the host resolves to an internal address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port, str(addresses[0]), path)


def _resolve(host: str, port: int, deadline: float) -> list:
    """Every address of ``host`` (a literal is itself), resolved within the deadline."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        raise RecordError("read", "timed out resolving the host") from None
    except OSError:
        raise _Retryable("cannot resolve the host") from None
    found = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not found:
        raise RecordError("read", "cannot resolve the host")
    return found


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
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def get(self, url: str) -> bytes:
        with host_slot(url, self.http.per_host):
            return self._with_retries(url)

    def _with_retries(self, url: str) -> bytes:
        for attempt in range(self.http.retries + 1):
            try:
                return self._attempt(url, time.monotonic() + self.http.timeout_s)
            except _Retryable as exc:
                if attempt == self.http.retries:
                    raise RecordError("read", exc.reason) from None
                time.sleep(exc.wait_s if exc.wait_s is not None else _backoff(attempt))
        raise AssertionError("unreachable")

    def _attempt(self, url: str, deadline: float) -> bytes:
        """One attempt: follow up to MAX_REDIRECTS redirects, checking every hop, then the body."""
        for _ in range(MAX_REDIRECTS + 1):
            target = check_url(url, self.http.allow_networks, deadline)
            response = self._request(target, deadline)
            done = False
            try:
                location = response.headers.get("Location")
                if response.status in REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    continue
                _raise_for_status(response)
                body = _read_body(response, self.http.max_bytes, deadline)
                done = True
                return body
            finally:
                if not done:  # a body left unread: the connection cannot be reused
                    response.close()
                response.release_conn()
        raise RecordError("read", f"more than {MAX_REDIRECTS} redirects")

    def _request(self, target: Target, deadline: float) -> urllib3.BaseHTTPResponse:
        left = _left(deadline)
        headers = {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        try:
            return self._pool(target).urlopen(
                "GET",
                target.path,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=left, read=left),
                assert_same_host=False,
            )
        except urllib3.exceptions.SSLError:
            raise RecordError("read", "TLS error") from None
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(_reason(exc)) from None

    def _pool(self, target: Target) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, target.address, target.port, target.host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _new_pool(target, self.http.per_host)
            return pool


def _new_pool(target: Target, size: int) -> urllib3.HTTPConnectionPool:
    """A pool that connects to the checked address; TLS still verifies the host's certificate."""
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            maxsize=size,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    return urllib3.HTTPConnectionPool(target.address, target.port, maxsize=size)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RecordError("read", "timed out")
    return left


def _backoff(attempt: int) -> float:
    return min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S) if attempt else 0.0


def _raise_for_status(response: urllib3.BaseHTTPResponse) -> None:
    if 200 <= response.status < 300:
        return
    if response.status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {response.status}", _retry_after(response.headers.get("Retry-After")))
    raise RecordError("read", f"HTTP {response.status}")


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value.strip()), RETRY_AFTER_MAX_S)
    return None


def _read_body(response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RecordError("read", f"larger than max_bytes ({max_bytes})")
    body = bytearray()
    # The cap is checked while streaming too (a body may come without Content-Length), and the
    # deadline before every read: each socket read gets only the time that is left.
    while True:
        _set_read_timeout(response, _left(deadline))
        try:
            chunk = response.read1(CHUNK_BYTES)
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise RecordError("read", _reason(exc)) from None
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise RecordError("read", f"larger than max_bytes ({max_bytes})")


def _set_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _reason(exc: BaseException) -> str:
    """A short reason, never bytes."""
    # NewConnectionError is a subclass of urllib3's TimeoutError, oddly: test it first
    if isinstance(exc, (urllib3.exceptions.NewConnectionError, ConnectionError)):
        return f"connection failed ({type(exc).__name__})"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection failed (ProtocolError)"
    return f"{type(exc).__name__}: {str(exc)[:150]}"
