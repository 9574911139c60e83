"""Search ids that say when they were minted: 12 hex digits of Unix milliseconds, then 20 random.

Still 32 lowercase hex digits (the API's format), and sortable by time. Feedback for an id that
is not in the database polls for it only while the search may still be on its way there; an
older id (or one from before this format, whose first digits read as a random time) is unknown
at once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

_TIME_DIGITS = 12  # 48 bits of milliseconds: until the year 10889


def new_search_id(clock: Callable[[], float] = time.time) -> str:
    return f"{int(clock() * 1000):0{_TIME_DIGITS}x}{secrets.token_hex(10)}"


def minted_at(search_id: str) -> float:
    """The Unix time an id from `new_search_id` was minted (for another id, a meaningless time)."""
    return int(search_id[:_TIME_DIGITS], 16) / 1000


def may_be_in_flight(search_id: str, window_s: float, now: float, clock_skew_s: float = 1.0) -> bool:
    """Whether a search with this id may not have reached the database yet: minted within the
    last `window_s` (tolerating `clock_skew_s` between the machines that minted and ask)."""
    age = now - minted_at(search_id)
    return -clock_skew_s <= age <= window_s + clock_skew_s
