"""Rate limits and capacity: token buckets per client, and a bounded number of photo searches.

A client is known only by an HMAC of its address under a key that rotates every UTC day (and is
never written anywhere): the buckets of one day cannot be tied to the addresses of another, and
the address itself is never kept, logged or stored. At most ``max_clients`` buckets are kept; the
least recently used go first (a full bucket is what a new client gets anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


class Limited(Exception):
    """Over a rate limit (429) or over capacity (503); ``retry_after`` in whole seconds."""

    def __init__(self, status: int, retry_after: int, message: str):
        super().__init__(message)
        self.status, self.retry_after, self.message = status, max(1, int(retry_after)), message


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class ClientKeys:
    """HMAC-SHA256 of a client address under a secret derived per UTC day from a process secret."""

    def __init__(self, clock=time.time):
        self.secret = secrets.token_bytes(32)
        self.clock = clock
        self.day: int | None = None
        self.key = b""

    def __call__(self, address: str) -> str:
        day = int(self.clock() // 86400)
        if day != self.day:
            self.day = day
            self.key = hmac.new(self.secret, str(day).encode(), hashlib.sha256).digest()
        return hmac.new(self.key, address.encode(), hashlib.sha256).hexdigest()[:32]


class RateLimiter:
    """Token buckets: ``rate`` requests per ``period_s``, bursts up to ``rate``."""

    def __init__(
        self,
        name: str,
        rate: int,
        period_s: float,
        keys: ClientKeys,
        max_clients: int = 100_000,
        clock=time.monotonic,
    ):
        self.name, self.rate, self.per_s = name, float(rate), float(rate) / float(period_s)
        self.keys, self.max_clients, self.clock = keys, max_clients, clock
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.lock = threading.Lock()
        self.day = keys.day

    def take(self, address: str) -> None:
        key = self.keys(address)
        now = self.clock()
        with self.lock:
            if self.keys.day != self.day:  # a new day's key: yesterday's buckets can no longer be found
                self.buckets.clear()
                self.day = self.keys.day
            bucket = self.buckets.pop(key, None) or _Bucket(self.rate, now)
            bucket.tokens = min(self.rate, bucket.tokens + (now - bucket.stamp) * self.per_s)
            bucket.stamp = now
            self.buckets[key] = bucket
            while len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = math.ceil((1 - bucket.tokens) / self.per_s)
        raise Limited(429, wait, f"too many {self.name} from this address; try again in {wait} s")


class Capacity:
    """At most ``slots`` photo searches admitted at once (``workers`` running plus ``queue``
    waiting); one more is refused at once, never queued without bound."""

    def __init__(self, slots: int, retry_after_s: int):
        self.slots, self.retry_after_s = slots, retry_after_s
        self.in_use = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            if self.in_use >= self.slots:
                raise Limited(503, self.retry_after_s, "the service is busy; try again shortly")
            self.in_use += 1
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.in_use -= 1
        return False
