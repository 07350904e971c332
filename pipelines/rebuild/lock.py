"""One rebuild at a time: a lock object with an expiry under the index root. (The same lock, under
another name, keeps erasure sweeps of one index root to one at a time: ``indexing.erase``.)

Taking it is a create-only write (an exclusive create locally, an upload with
``ifGenerationMatch=0`` on gs://), so of two rebuilds exactly one gets it. The holder renews the
expiry from a background thread by compare-and-swap; a lock whose expiry has passed (or, on the
same host, whose process is gone) is taken over by compare-and-swap too, so of two rebuilds that
find the same stale lock only one wins. A holder that finds its lock taken over stops before it
moves CURRENT.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass

from pipelines.core import storage
from pipelines.core.errors import FaceauditError, FatalError

LOCK_NAME = "_rebuild.lock"
DEFAULT_TTL_S = 3600


class LockHeld(FaceauditError):
    """Another process holds the lock."""


@dataclass(frozen=True, slots=True)
class LockInfo:
    owner: str  # host:pid
    host: str
    pid: int
    nonce: str
    started_at: str
    expires_at: str
    holder: str = "a rebuild"  # what the holder is doing (older locks lack it: they were rebuilds)

    def expired(self, now: dt.datetime) -> bool:
        return dt.datetime.fromisoformat(self.expires_at) <= now

    def describe(self) -> str:
        return f"held by {self.owner} since {self.started_at}, expires {self.expires_at}"


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_lock(data: bytes) -> LockInfo | None:
    """The lock's content, or None when it is unreadable (a torn write cannot happen; a hand edit can)."""
    try:
        return LockInfo(**json.loads(data))
    except (ValueError, TypeError):
        return None


def process_gone(info: LockInfo) -> bool:
    """On this host only: the holder's process no longer exists."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RebuildLock:
    """``with RebuildLock(index_uri): ...`` holds the lock for the block (or raises LockHeld)."""

    def __init__(
        self,
        index: str,
        ttl_s: int = DEFAULT_TTL_S,
        renew: bool = True,
        name: str = LOCK_NAME,
        holder: str = "a rebuild",
    ):
        self.uri = storage.join(index, name)
        self.holder = holder  # what the lock's holder is doing, for messages
        self.ttl_s = ttl_s
        self.renew = renew
        self.info: LockInfo | None = None
        self.token: str | None = None
        self.lost = False
        self.took_over: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self, started_at: str | None = None) -> LockInfo:
        now = now_utc()
        host = socket.gethostname()
        nonce = self.info.nonce if self.info else uuid.uuid4().hex
        return LockInfo(
            f"{host}:{os.getpid()}",
            host,
            os.getpid(),
            nonce,
            started_at or now.isoformat(),
            (now + dt.timedelta(seconds=self.ttl_s)).isoformat(),
            self.holder,
        )

    def acquire(self) -> LockInfo:
        info = self._body()
        data = json.dumps(asdict(info)).encode()
        try:
            storage.write_atomic(self.uri, data, create_only=True)
        except storage.AlreadyExists:
            self._take_over_if_stale(info, data)
        found, token = storage.read_versioned(self.uri)
        if found != data:  # someone replaced it between our write and this read: not ours
            raise LockHeld(self._held_message(found))
        self.info, self.token = info, token
        if self.renew:
            self._thread = threading.Thread(target=self._heartbeat, name="rebuild-lock", daemon=True)
            self._thread.start()
        return info

    def _take_over_if_stale(self, mine: LockInfo, data: bytes) -> None:
        found, token = storage.read_versioned(self.uri)
        if found is None:  # released meanwhile: create again (and lose cleanly to a faster one)
            try:
                storage.write_atomic(self.uri, data, create_only=True)
                return
            except storage.AlreadyExists:
                raise LockHeld(self._held_message(storage.read_versioned(self.uri)[0])) from None
        held = parse_lock(found)
        if held is not None and not held.expired(now_utc()) and not process_gone(held):
            raise LockHeld(self._held_message(found))
        try:
            storage.write_if_unchanged(self.uri, data, token)
        except storage.Conflict:
            raise LockHeld(self._held_message(storage.read_versioned(self.uri)[0])) from None
        self.took_over = held

    def _held_message(self, found: bytes | None) -> str:
        held = parse_lock(found) if found else None
        who = held.describe() if held else "holder unknown"
        return f"{held.holder if held else self.holder} is in progress ({who}); lock {self.uri}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                self.refresh()
            except (OSError, FaceauditError):
                continue  # a transient store error: try again next beat, the expiry leaves room

    def refresh(self) -> None:
        """Push the expiry forward; marks the lock lost if someone else took it over."""
        with self._mutex:
            if self.lost or self.info is None or self.token is None:
                return
            info = self._body(self.info.started_at)
            try:
                self.token = storage.write_if_unchanged(
                    self.uri, json.dumps(asdict(info)).encode(), self.token
                )
                self.info = info
            except storage.Conflict:
                self.lost = True

    def check(self) -> None:
        """Fail loudly if the lock was lost (expired and taken over): nothing may be published."""
        if self.lost:
            raise FatalError(f"the lock {self.uri} was taken over by another process; {self.holder} stops")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.lost or self.info is None:
                return
            found, _ = storage.read_versioned(self.uri)
            held = parse_lock(found) if found else None
            if held is not None and held.nonce == self.info.nonce:
                storage.remove(self.uri)
            self.info = None

    def __enter__(self) -> RebuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(index: str) -> LockInfo | None:
    """Who holds the lock of ``index`` now, if anyone."""
    found, _ = storage.read_versioned(storage.join(index, LOCK_NAME))
    return parse_lock(found) if found else None
