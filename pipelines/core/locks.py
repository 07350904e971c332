"""Locks under an index root: objects with an expiry, taken create-only, on local disk or gs://.

* ``_rebuild.lock``: one rebuild at a time (``pipelines.rebuild``).
* ``_erase.lock``: one erasure sweep at a time; index builds and rebuilds hold it too, from their
  scan of the runs to the move of CURRENT, since a sweep rewrites run shards that a build reads by
  row position (``sweep_lock``).

Taking a lock is a create-only write (an exclusive create locally, an upload with
``ifGenerationMatch=0`` on gs://), so of two takers exactly one gets it. The holder renews the
expiry from a background thread by compare-and-swap; a lock whose expiry has passed (or, on the
same host, whose process is gone) is taken over by compare-and-swap too, so of two takers that
find the same stale lock only one wins. A holder that finds its lock taken over stops before it
publishes anything (``check``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from . import storage
from .errors import FaceauditError, FatalError

LOCK_NAME = "_rebuild.lock"
EXIT_LOCKED = 3  # a command whose lock another process holds: a scheduler may try again later
DEFAULT_TTL_S = 3600
SWEEP_LOCK = "_erase.lock"  # under the index root while a sweep (or a build) runs
SWEEP_WAIT_S = 900.0  # how long an eraser or a build waits for another sweep to finish


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


class ExpiringLock:
    """``with ExpiringLock(index_uri): ...`` holds the lock for the block (or raises LockHeld)."""

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
            self._thread = threading.Thread(target=self._heartbeat, name="index-lock", daemon=True)
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

    def __enter__(self) -> ExpiringLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(index: str) -> LockInfo | None:
    """Who holds the lock of ``index`` now, if anyone."""
    found, _ = storage.read_versioned(storage.join(index, LOCK_NAME))
    return parse_lock(found) if found else None


@contextlib.contextmanager
def sweep_lock(root: str, holder: str = "an erasure sweep", wait_s: float = SWEEP_WAIT_S) -> Iterator[None]:
    """Hold the index root's sweep lock for the block, waiting up to ``wait_s`` for its holder.

    Erasure sweeps take it, and so do index builds and rebuilds from their scan of the runs to
    the move of CURRENT: a sweep rewrites run shards that a build reads by row position."""
    lock = ExpiringLock(root, ttl_s=600, name=SWEEP_LOCK, holder=holder)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except LockHeld as held:
            if time.monotonic() >= deadline:
                raise FatalError(f"{held}; waited {wait_s:g} s, try again later") from None
            time.sleep(1.0)
    try:
        yield
    finally:
        lock.release()
