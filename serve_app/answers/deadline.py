"""One hard deadline per answer, and retries that never sleep past it (pure; the clock is injectable).

Every provider call gets the time that remains, capped per call; a retry after a 429 or 5xx
waits a jittered exponential backoff, or the server's `Retry-After` when it gives one, and is
not attempted when that wait would end after the deadline.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Deadline:
    at: float  # on `clock`'s scale
    clock: Clock = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def call_timeout(self, cap_s: float) -> float:
        """What one call may take: the time that remains, at most `cap_s`."""
        return min(self.remaining(), cap_s)

    @staticmethod
    def overrun_reason(timeout_s: float, cap_s: float) -> str:
        """Why a call given `timeout_s` ran out: the deadline (`budget`) set it, or the call's cap.

        Decided by which bound set the timeout, not by reading the clock afterwards: a timer may
        fire a hair before the deadline reads as expired.
        """
        return "budget" if timeout_s < cap_s else "timeout"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # calls in all, the first included
    base_delay_s: float
    max_delay_s: float

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Wait before call `attempt + 1` (attempt counts from 1): the server's word, else full jitter.

        Full jitter (a uniform draw below the exponential bound) spreads retries of many clients
        that failed together, so they do not return together.
        """
        if retry_after_s is not None:
            return max(0.0, retry_after_s)
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None when absent or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None
