"""The expiring lock's heartbeat (pipelines/core/locks.py), driven step by step.

Nothing here sleeps or bets on timing: the lock's clock (``locks.now_utc``) is a variable the test
moves, and the heartbeat thread's wait (``ExpiringLock._stop.wait``) is replaced by a gate that
lets one beat through at a time and says when the thread is back waiting, so a beat is over.
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pipelines.core import locks
from pipelines.core.locks import LOCK_NAME, ExpiringLock, LockHeld, read_lock

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
TTL_S = 60
SAFETY_S = 30  # only bounds a hang; every wait below returns as soon as its event happens


class Clock:
    """``locks.now_utc`` under the test's control."""

    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class BeatGate:
    """Stands in for the heartbeat's stop Event: each ``wait`` (one per beat) blocks until the test
    lets a beat through or the lock is released, and counts the waits, so that after ``beat()``
    returns the thread has run one refresh and is waiting again."""

    def __init__(self):
        self.stopped = threading.Event()
        self.passes = threading.Semaphore(0)
        self.cond = threading.Condition()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        with self.cond:
            self.waits += 1
            self.cond.notify_all()
        assert self.passes.acquire(timeout=SAFETY_S), "the test never let a beat through"
        return self.stopped.is_set()

    def set(self) -> None:  # release(): stop the thread
        self.stopped.set()
        self.passes.release()

    def is_set(self) -> bool:
        return self.stopped.is_set()

    def waiting(self, n: int) -> None:
        """Block until the heartbeat thread has started its n-th wait."""
        with self.cond:
            assert self.cond.wait_for(lambda: self.waits >= n, timeout=SAFETY_S), (
                f"{self.waits} waits, not {n}"
            )

    def beat(self) -> None:
        """Let one beat through and wait until it is done (the thread waits again)."""
        n = self.waits
        self.passes.release()
        self.waiting(n + 1)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock(T0)
    monkeypatch.setattr(locks, "now_utc", clock)
    return clock


def held_lock(index: str) -> tuple[ExpiringLock, BeatGate]:
    lock = ExpiringLock(index, ttl_s=TTL_S)  # renew=True: the heartbeat thread runs
    gate = BeatGate()
    lock._stop = gate
    lock.acquire()
    gate.waiting(1)  # the thread is up, before its first beat
    return lock, gate


def test_the_heartbeat_pushes_the_expiry_forward(tmp_path, clock):
    index = str(tmp_path / "index")
    lock, gate = held_lock(index)
    try:
        first = read_lock(index)
        assert dt.datetime.fromisoformat(first.expires_at) == T0 + dt.timedelta(seconds=TTL_S)
        clock.advance(TTL_S / 2)
        gate.beat()
        renewed = read_lock(index)
        assert dt.datetime.fromisoformat(renewed.expires_at) == clock.now + dt.timedelta(seconds=TTL_S)
        assert renewed.nonce == first.nonce and renewed.started_at == first.started_at
        assert lock.info.expires_at == renewed.expires_at and not lock.lost
    finally:
        lock.release()
    assert read_lock(index) is None


def test_a_renewed_lock_is_not_taken_over_after_its_first_expiry(tmp_path, clock):
    """Past the expiry the lock was taken with, a holder that kept beating still holds it: another
    taker is refused; once the beats stop, the expiry passes and the other taker gets it."""
    index = str(tmp_path / "index")
    lock, gate = held_lock(index)
    try:
        for _ in range(3):  # three beats, each a third of the ttl apart, as the thread beats
            clock.advance(TTL_S / 3)
            gate.beat()
        clock.advance(TTL_S / 3)  # now T0 + 4/3 ttl: the expiry it was taken with has passed
        with pytest.raises(LockHeld, match="a rebuild is in progress"):
            ExpiringLock(index, ttl_s=TTL_S, renew=False).acquire()
        lock.check()  # still the holder
        clock.advance(TTL_S)  # no beat for a whole ttl (a hung holder): now it may be taken over
        other = ExpiringLock(index, ttl_s=TTL_S, renew=False)
        other.acquire()
        assert other.took_over is not None and other.took_over.nonce == lock.info.nonce
        gate.beat()  # the old holder's next beat finds its lock taken over
        assert lock.lost
        with pytest.raises(locks.FatalError, match="taken over"):
            lock.check()
    finally:
        lock.release()  # leaves the new holder's lock alone
    assert read_lock(index).nonce == other.info.nonce
    other.release()
    assert not (tmp_path / "index" / LOCK_NAME).exists()
