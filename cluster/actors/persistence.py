"""How the actors reach the database: short connects, and retries in the background.

An actor's constructor and its request path never wait on PostgreSQL: Ray does not restart an
actor whose constructor raised, and a caller (a replica, an operator rolling back) must not hang
on a database that is down. Loads and saves run on threads that retry until they succeed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import asyncpg

CONNECT_TIMEOUT_S = 5.0  # asyncpg's default is 60 s
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0  # the database is back in use at most this long after it returns

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """One short-lived connection; gives up connecting after `CONNECT_TIMEOUT_S`."""
    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S, command_timeout=CONNECT_TIMEOUT_S * 6)
    try:
        yield conn
    finally:
        await conn.close()


def retry_until_done(what: str, attempt: Callable[[], None]) -> None:
    """Call `attempt` until it returns, waiting 0.5 s, 1 s, ... up to `MAX_RETRY_S` between tries.

    Says so once when it starts failing and once when it succeeds again, not on every try.
    """
    wait_s, failures = FIRST_RETRY_S, 0
    while True:
        try:
            attempt()
        except Exception as error:
            if failures == 0:
                log.warning("%s failed; retrying in the background", what, extra={"error": repr(error)})
            failures += 1
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, MAX_RETRY_S)
            continue
        if failures:
            log.warning("%s succeeded after %d failed tries", what, failures)
        return


def in_background(name: str, target: Callable[[], None]) -> threading.Thread:
    """Run `target` on a daemon thread (the actor's process ends it)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
