"""Token buckets per API key (pure; the clock is injectable).

A key may send `burst` requests at once, then `rate_per_s` on average. Each process keeps its
own buckets: with N ingress replicas a key may get up to N times the rate (Serve spreads a
key's requests over the replicas), which keeps the limit free of shared state on the request path.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

Clock = Callable[[], float]
_MAX_IDLE_KEYS = 10_000  # past this many buckets, full ones (no state worth keeping) are dropped


@dataclasses.dataclass
class TokenBucket:
    capacity: float
    rate_per_s: float
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one will be there."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class RateLimiter:
    """One `TokenBucket` per key; `rate_per_s` 0 turns limiting off."""

    def __init__(self, rate_per_s: float, burst: int, clock: Clock = time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def retry_after(self, key: str) -> int:
        """0 when `key` may go ahead (and is charged a token), else whole seconds to wait (>= 1),
        as `Retry-After` gives them."""
        if not self.enabled:
            return 0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_IDLE_KEYS:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[key] = TokenBucket(self.burst, self.rate_per_s, self.burst, now)
        wait_s = bucket.take(now)
        return 0 if wait_s == 0.0 else max(1, math.ceil(wait_s))
