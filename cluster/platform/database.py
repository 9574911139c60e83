"""Where the database is: an external PostgreSQL (`DATABASE_URL`) or the embedded one, and pools to it.

The embedded server (a PostgreSQL with pgvector from a pip package) is reached over a Unix
socket in the project's state folder, so it never listens on a network address. Its lifetime is
`cluster.platform.embedded`'s alone, so another package with the same shape can replace it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolAcquireContext
from pgvector.asyncpg import register_vector

from cluster.platform.embedded import start_embedded
from cluster.platform.errors import ServiceUnavailable
from cluster.platform.settings import DatabaseSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not be reached or started; the message says what to check."""

    retry_after_s = 2


class PoolExhausted(DatabaseUnavailable):
    """No pooled connection came free in time: every one of this process's is in use."""

    retry_after_s = 1


def resolve_database_url(configured: str | None, state_dir: Path) -> str:
    """The configured URL, else that of the embedded server (started if need be)."""
    return configured or start_embedded(state_dir)


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,  # the server's max_connections reached
    # A server stopping ends the sessions in flight with these (SQLSTATE 57P01, 57P02).
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


# For /health: says what to check; the driver's own text goes to the log only.
DATABASE_DOWN = ("the database did not answer; check that PostgreSQL is running and reachable "
                 "(DATABASE_URL); the server log has the detail")


@contextlib.asynccontextmanager
async def unavailable_on_connection_errors(what: str) -> AsyncIterator[None]:
    """Turn lost connections and time-outs into `DatabaseUnavailable` (a 503, not a 500).

    The message is for callers and names only the part that failed; the driver's error stays
    the `__cause__`, which the HTTP edge logs.
    """
    try:
        yield
    except _CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"{what}: database unavailable; retry shortly") from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    await register_vector(connection)


class _AcquireWithin(PoolAcquireContext):
    """`async with pool.acquire()` that gives up after the pool's wait, as `PoolExhausted`."""

    __slots__ = ()

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            return await super().__aenter__()
        except TimeoutError as error:
            raise PoolExhausted(
                f"no database connection came free within {self.timeout:g} s (this process's pool is "
                "in use, or connecting is slow); retry shortly") from error


class BoundedPool(asyncpg.Pool):
    """A pool whose waits for a connection are bounded, so a burst is refused with a 503 rather
    than queued until the request's deadline. Every `pool.fetch` etc. acquires through it."""

    def __init__(self, *args: Any, acquire_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.acquire_timeout_s = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return _AcquireWithin(self, self.acquire_timeout_s if timeout is None else timeout)


async def create_pool(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    """A pool of `pool_size` connections that may grow by `max_overflow` under load; waiting for a
    free one takes at most `pool_timeout_s`."""
    try:
        return await BoundedPool(
            url,
            min_size=settings.pool_size,
            max_size=settings.pool_size + settings.max_overflow,
            max_queries=50_000,
            max_inactive_connection_lifetime=300.0,
            command_timeout=settings.command_timeout_s,
            init=_init_connection,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
            acquire_timeout_s=settings.pool_timeout_s,
        )
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact(url)}: {error}; "
            "check DATABASE_URL and that the server is running"
        ) from error


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code (e.g. a synchronous Ray actor).

    A fresh thread gets a fresh event loop: Ray may already run one in the calling thread.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
