"""Google Cloud Storage behind ``storage.py``: conditional whole-object writes and verified reads.

Every commit point is one simple (multipart) upload with an ``ifGenerationMatch`` precondition:
``0`` to create, or the generation that was read to replace (compare-and-swap). Only GETs and
conditional uploads are sent here, so every request may be retried; a 412 that follows an attempt
whose reply was lost counts as success only when the stored object's CRC32C and size are ours.
Uploads send their CRC32C and MD5 so that GCS refuses a body damaged on the way; downloads are
checked against the ``x-goog-hash`` GCS sends with them.

Listing and streaming reads go through gcsfs (``filesystem()``), a subclass that verifies whole
reads and in-order streams the same way. ``STORAGE_EMULATOR_HOST`` points both at an emulator,
with anonymous credentials; otherwise Application Default Credentials are used.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import google_crc32c
import requests

from .errors import AlreadyExists, Conflict

try:
    # gcsfs.core's file system, not the default gcsfs.GCSFileSystem: since 2026 that one asks the
    # Storage Control API over gRPC what kind each bucket is, which no emulator answers.
    from gcsfs.core import GCSFileSystem
except ImportError as exc:  # gcsfs, google-auth and google-crc32c come with the "gcs" extra
    raise ImportError("gs:// needs the gcs extra: pip install 'faceaudit[gcs]'") from exc

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
PRODUCTION = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
ATTEMPTS = 6  # per request, then the error is raised
BACKOFF_S = 0.25  # first wait; doubled each attempt, with jitter, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 8.0
TIMEOUT_S = (10, 120)  # connect, read
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
WHOLE_READ = 16 << 20  # objects up to this size are read whole (and verified) when opened


class GcsError(OSError):
    """A request that failed for good, or kept failing after every retry."""


class ChecksumMismatch(GcsError):
    """Bytes whose CRC32C differs from the one GCS holds for the object, on every try."""


class PreconditionFailed(Exception):
    """The object's generation was not the one the write was conditioned on (HTTP 412)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    generation: int
    size: int
    crc32c: str  # base64, as GCS writes it


def crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def split(uri: str) -> tuple[str, str]:
    """(bucket, object name) of ``gs://bucket/name`` (or ``bucket/name``)."""
    path = uri.split("://", 1)[-1]
    bucket, _, name = path.partition("/")
    return bucket, name


def endpoint() -> str:
    host = os.environ.get(EMULATOR_ENV, "")
    if host in ("", "default"):  # "default" means no emulator to google-cloud-storage and gcsfs too
        return PRODUCTION
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


# ---------------------------------------------------------------- HTTP with retries

_sessions: dict[tuple[int, str], requests.Session] = {}
_sessions_lock = threading.Lock()


def session() -> requests.Session:
    """One session per process and endpoint: anonymous for an emulator, else Application Default
    Credentials. Keyed by pid too, so a forked worker never shares its parent's sockets."""
    key = (os.getpid(), endpoint())
    with _sessions_lock:
        if key not in _sessions:
            _sessions[key] = _new_session(key[1])
        return _sessions[key]


def _new_session(url: str) -> requests.Session:
    if url == PRODUCTION:
        import google.auth
        from google.auth.transport.requests import AuthorizedSession

        credentials, _ = google.auth.default(scopes=[SCOPE])
        return AuthorizedSession(credentials)
    plain = requests.Session()
    plain.trust_env = False  # an emulator is reached directly, never through a configured proxy
    return plain


def _send(method: str, url: str, **kwargs) -> tuple[requests.Response, bool]:
    """The first response that is not worth retrying, and whether an earlier attempt may have landed.

    Only for idempotent or conditional requests: a lost reply or a 5xx may hide a request that did
    take effect, which is what the returned flag says.
    """
    uncertain = False
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S) * (0.5 + random.random() / 2))
        try:
            response = session().request(method, url, timeout=TIMEOUT_S, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            log.warning("GCS %s: %s (attempt %d of %d)", method, type(exc).__name__, attempt + 1, ATTEMPTS)
            uncertain = True
            continue
        if response.status_code not in RETRY_STATUS:
            return response, uncertain
        log.warning("GCS %s: HTTP %d (attempt %d of %d)", method, response.status_code, attempt + 1, ATTEMPTS)
        uncertain = True
    raise GcsError(f"GCS {method} {_safe(url)} still failing after {ATTEMPTS} attempts")


def _safe(url: str) -> str:
    return url.split("?", 1)[0]  # the query may carry an upload id; paths never carry credentials


def _object_url(bucket: str, name: str) -> str:
    return f"{endpoint()}/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"


def _fail(response: requests.Response, what: str) -> OSError:
    if response.status_code == 404:
        return FileNotFoundError(what)
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason
    return GcsError(f"GCS HTTP {response.status_code} for {what}: {message}")


# ---------------------------------------------------------------- objects


def stat(uri: str) -> ObjectInfo | None:
    """The object's generation, size and CRC32C; None when it does not exist."""
    bucket, name = split(uri)
    response, _ = _send("GET", _object_url(bucket, name), params={"fields": "generation,size,crc32c"})
    if response.status_code == 404:
        return None
    if not response.ok:
        raise _fail(response, uri)
    body = response.json()
    return ObjectInfo(int(body["generation"]), int(body["size"]), body["crc32c"])


def get(uri: str) -> tuple[bytes, int] | None:
    """(bytes, generation), checked against the CRC32C GCS sends; None when absent."""
    bucket, name = split(uri)
    for attempt in range(ATTEMPTS):
        response, _ = _send("GET", _object_url(bucket, name), params={"alt": "media"})
        if response.status_code == 404:
            return None
        if not response.ok:
            raise _fail(response, uri)
        if crc32c(response.content) == header_crc32c(response.headers):
            return response.content, int(response.headers["x-goog-generation"])
        log.warning("GCS GET %s: CRC32C mismatch (attempt %d of %d)", uri, attempt + 1, ATTEMPTS)
    raise ChecksumMismatch(f"{uri}: downloaded bytes do not match the stored CRC32C, {ATTEMPTS} times")


def header_crc32c(headers) -> str | None:
    """The crc32c part of ``x-goog-hash: crc32c=...,md5=...`` (several headers may be joined)."""
    for part in headers.get("x-goog-hash", "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "crc32c":
            return value
    return None


def put(uri: str, data: bytes, if_generation_match: int) -> int:
    """Upload ``data`` whole iff the object's generation is ``if_generation_match`` (0: it is absent).

    Returns the new generation; raises PreconditionFailed when the condition does not hold.
    """
    bucket, name = split(uri)
    checksum = crc32c(data)
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    meta = {"name": name, "crc32c": checksum, "md5Hash": md5}
    boundary = "faceaudit-" + os.urandom(12).hex()
    body = _multipart(boundary, meta, data)
    url = f"{endpoint()}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
    params = {"uploadType": "multipart", "ifGenerationMatch": str(if_generation_match)}
    headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
    response, uncertain = _send("POST", url, params=params, data=body, headers=headers)
    if response.status_code == 412:
        return _after_412(uri, checksum, len(data), uncertain)
    if not response.ok:
        raise _fail(response, uri)
    stored = response.json()
    if stored.get("crc32c") != checksum or int(stored.get("size", -1)) != len(data):
        # GCS itself refuses a body that does not match the crc32c sent with it; a server that
        # stored one anyway (an emulator) must not leave it visible.
        _delete(uri, int(stored["generation"]))
        raise ChecksumMismatch(f"{uri}: the stored object's CRC32C or size is not that of the bytes sent")
    return int(stored["generation"])


def _delete(uri: str, generation: int) -> None:
    """Delete exactly this generation (conditional, hence safe to retry)."""
    bucket, name = split(uri)
    response, _ = _send("DELETE", _object_url(bucket, name), params={"ifGenerationMatch": str(generation)})
    if not response.ok and response.status_code not in (404, 412):
        raise _fail(response, uri)


def _after_412(uri: str, checksum: str, size: int, uncertain: bool) -> int:
    """A 412 after a lost reply may be our own write seen again: success iff the bytes are ours."""
    if uncertain:
        info = stat(uri)
        if info is not None and info.crc32c == checksum and info.size == size:
            log.info("GCS upload %s: 412 after a lost reply, and the stored object is ours", uri)
            return info.generation
    raise PreconditionFailed(uri)


def _multipart(boundary: str, meta: dict, data: bytes) -> bytes:
    head = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(meta)}\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode()


# ---------------------------------------------------------------- what storage.py calls


def write_atomic(uri: str, data: bytes, create_only: bool) -> None:
    """Create ``uri``; or, unless ``create_only``, replace the version found there.

    A replacement is conditioned on the generation just read, so two writers cannot silently
    overwrite each other (the loser gets Conflict); identical bytes already there are left alone,
    which keeps a resumed run's rewrite of a shard idempotent.
    """
    try:
        put(uri, data, 0)
        return
    except PreconditionFailed:
        if create_only:
            raise AlreadyExists(uri) from None
    info = stat(uri)
    if info is not None and info.crc32c == crc32c(data) and info.size == len(data):
        return
    try:
        put(uri, data, info.generation if info else 0)
    except PreconditionFailed:
        raise Conflict(f"{uri} was changed by another writer while this one replaced it") from None


def read_versioned(uri: str) -> tuple[bytes | None, str]:
    found = get(uri)
    if found is None:
        return None, "0"
    data, generation = found
    return data, str(generation)


def write_if_unchanged(uri: str, data: bytes, token: str) -> str:
    try:
        return str(put(uri, data, int(token)))
    except PreconditionFailed:
        raise Conflict(f"{uri} changed since it was read (expected generation {token})") from None


def generations(uri: str) -> tuple[int | None, list[int]]:
    """(live generation or None, noncurrent generations) of one object, in a versioned bucket or not."""
    bucket, name = split(uri)
    url = f"{endpoint()}/storage/v1/b/{quote(bucket, safe='')}/o"
    live, old, token = None, [], None
    while True:
        params = {
            "prefix": name,
            "versions": "true",
            "fields": "items(name,generation,timeDeleted),nextPageToken",
        }
        if token:
            params["pageToken"] = token
        response, _ = _send("GET", url, params=params)
        if not response.ok:
            raise _fail(response, uri)
        body = response.json()
        for item in body.get("items", []):
            if item["name"] != name:
                continue  # same prefix, another object
            if item.get("timeDeleted"):
                old.append(int(item["generation"]))
            else:
                live = int(item["generation"])
        token = body.get("nextPageToken")
        if not token:
            return live, sorted(old)


def purge_noncurrent(uri: str) -> int:
    """Delete every noncurrent generation of ``uri`` (erasure: old bytes must not linger); the live one
    stays. Returns how many were deleted. Checks afterwards that the live generation survived."""
    live, old = generations(uri)
    bucket, name = split(uri)
    for generation in old:
        # generation= names exactly this noncurrent version; ifGenerationMatch makes a retry harmless
        params = {"generation": str(generation), "ifGenerationMatch": str(generation)}
        response, _ = _send("DELETE", _object_url(bucket, name), params=params)
        if not response.ok and response.status_code not in (404, 412):
            raise _fail(response, f"{uri} generation {generation}")
    after_live, left = generations(uri)
    if after_live != live:
        raise GcsError(
            f"{uri}: deleting noncurrent generations removed the live one (generation {live}); "
            "this storage does not honour the generation parameter of DELETE"
        )
    if left:
        raise GcsError(f"{uri}: noncurrent generations {left} are still there after deleting them")
    return len(old)


# ---------------------------------------------------------------- gcsfs, verified


class CheckedGCSFileSystem(GCSFileSystem):
    """gcsfs whose whole-object reads and in-order streams are checked against the stored CRC32C."""

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        if start not in (None, 0) or end is not None:
            return await super()._cat_file(path, start=start, end=end, **kwargs)
        for attempt in range(ATTEMPTS):
            headers, data = await self._call("GET", self.url(path))
            if crc32c(data) == header_crc32c(headers):
                return data
            log.warning("GCS read %s: CRC32C mismatch (attempt %d of %d)", path, attempt + 1, ATTEMPTS)
        raise ChecksumMismatch(f"gs://{path}: downloaded bytes do not match the stored CRC32C, {ATTEMPTS}x")

    def _open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            return super()._open(path, mode, **kwargs)
        info = self.info(path)
        if info["size"] <= WHOLE_READ:
            # Small objects (shards, lists, images): one verified GET, then any access pattern.
            return io.BytesIO(self.cat_file(path))
        block = kwargs.get("block_size") or self.default_block_size
        return io.BufferedReader(CheckedStream(self, path, info), buffer_size=block)


class CheckedStream(io.RawIOBase):
    """A large object read by ranged GETs of one generation; its CRC32C is checked when it has been
    read from start to end in order (a tar stream, a sha256 pass). Memory: one buffer."""

    def __init__(self, fs: CheckedGCSFileSystem, path: str, info: dict):
        super().__init__()
        self.fs, self.path, self.size = fs, path, int(info["size"])
        self.generation, self.expected = info.get("generation"), info.get("crc32c")
        self.pos = 0
        self.crc = google_crc32c.Checksum()
        self.done = 0  # bytes [0, done) have gone into the running CRC32C

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self.fs.cat_file(self.path, start=self.pos, end=self.pos + n, generation=self.generation)
        buffer[: len(data)] = data
        self._track(self.pos, data)
        self.pos += len(data)
        return len(data)

    def _track(self, start: int, data: bytes) -> None:
        if start <= self.done < start + len(data):
            self.crc.update(data[self.done - start :])
            self.done = start + len(data)
            if self.done == self.size and self.expected:
                if base64.b64encode(self.crc.digest()).decode() != self.expected:
                    raise ChecksumMismatch(f"gs://{self.path}: streamed bytes do not match the stored CRC32C")


def filesystem() -> CheckedGCSFileSystem:
    """The gcsfs instance for the current endpoint (fsspec caches one per set of arguments)."""
    emulator = endpoint() != PRODUCTION
    return CheckedGCSFileSystem(
        endpoint_url=endpoint() if emulator else None,
        token="anon" if emulator else "google_default",
        consistency="md5",  # gcsfs's own put_file/get_file check MD5 (its CRC32C check needs crcmod)
        # Objects written by put() bypass gcsfs, so a cached listing would go stale: never cache.
        use_listings_cache=False,
    )
