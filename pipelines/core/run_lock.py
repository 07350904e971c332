"""The run lock: one process writes a run at a time (``run.hold_run`` holds it for a whole run).

Locally an ``flock`` on ``<run>/_run.lock`` (0600, holding ``host:pid``), released by the kernel
when the process dies however it dies, and closed in forked children so that they cannot keep it
alive; on gs:// an ``ExpiringLock`` object with a heartbeat. A second process gets ``LockHeld``
naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import time

from . import storage
from .errors import ConfigError
from .locks import ExpiringLock, LockHeld
from .writer import RUN_LOCK

RUN_LOCK_TTL_S = 900  # gs://: a run lock whose heartbeat stopped this long ago is stale (its holder died)


_HELD: set[int] = set()  # descriptors of run locks this process holds


def _close_held_in_child() -> None:
    """A forked child must not keep its parent's run lock alive after the parent dies."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # closes the child's copy only; the parent still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """The run's exclusive lock: ``with RunLock(run_uri, run_id): ...`` or LockHeld.

    Locally a ``flock`` on ``<run>/_run.lock`` (0600), which the kernel releases when the process
    dies however it dies; the file holds the holder's ``host:pid`` for the message a second
    process prints, and is removed on release. On gs:// an ``ExpiringLock`` object in the run
    folder (a create-only upload with a generation precondition, an expiry renewed by a heartbeat,
    taken over only once stale); ``check`` fails if it was taken over meanwhile.
    """

    def __init__(self, run: str, run_id: str, ttl_s: int = RUN_LOCK_TTL_S):
        self.uri = storage.join(run, RUN_LOCK)
        self.holder = f"ingest run {run_id}"
        self._fd: int | None = None
        self._remote: ExpiringLock | None = None
        if not storage.is_local(run):
            if not storage.is_gcs(run):
                raise ConfigError(f"runs are written to a local folder or gs://, not {run}")
            self._remote = ExpiringLock(run, ttl_s=ttl_s, name=RUN_LOCK, holder=self.holder)

    def acquire(self) -> None:
        if self._remote is not None:
            self._remote.acquire()
            return
        path = storage.url_to_fs(self.uri)[1]
        storage.make_dirs(os.path.dirname(path))
        while True:
            fd = storage.create_private(path, os.O_RDWR | os.O_CREAT)
            if not _flock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{self.holder} is in progress ({holder}); lock {path}")
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file as it let go: lock the one there now
        host = socket.gethostname()
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        info = {"owner": f"{host}:{os.getpid()}", "host": host, "pid": os.getpid(), "started_at": now}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(fd)

    def check(self) -> None:
        """Before the run's commit: FatalError if the lock was taken over (gs://, expired)."""
        if self._remote is not None:
            self._remote.check()

    def release(self) -> None:
        if self._remote is not None:
            self._remote.release()
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        path = storage.url_to_fs(self.uri)[1]
        try:
            if _same_file(fd, path):
                os.unlink(path)  # while still locked: a waiter re-checks the file it locked
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int, tries: int = 5) -> bool:
    """Take the exclusive lock without waiting for a holder; a few quick retries ride over a
    probe (``faceaudit gc`` asks whether a run is alive by taking a shared lock for an instant)."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def _same_file(fd: int, path: str) -> bool:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (found.st_dev, found.st_ino)


def _read_holder(fd: int, tries: int = 20) -> str:
    """``held by host:pid since ...`` from the lock file (its holder writes it just after locking)."""
    for attempt in range(tries):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"held by {info['owner']} since {info['started_at']}; it goes when that process ends"
        except (ValueError, TypeError, KeyError):
            if attempt + 1 < tries:
                time.sleep(0.05)
    return "holder unknown"
