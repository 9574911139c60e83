"""What a replica's `check_health` asks of itself: only what a restart of that replica would mend.

Serve calls `check_health` every `DTRAG_HEALTH_CHECK_PERIOD_S` and restarts a replica whose check
raises or hangs. So the check never asks a dependency that every replica shares (the database,
the embedder, an actor): while PostgreSQL is down, all replicas would fail together and be
restarted in a loop, and a new replica cannot even start without the database. Shared outages
show in `/health` and answer 503 instead; the replica keeps its pool, which reconnects when the
database returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg


class ReplicaBroken(RuntimeError):
    """Something only a restart of this replica mends; Serve restarts it."""


def check_alive(pool: asyncpg.Pool, background: Sequence[asyncio.Task]) -> None:
    """Raise `ReplicaBroken` when the replica's pool is closed or one of its background loops (they
    run for the replica's whole life) has ended."""
    if pool.is_closing():
        raise ReplicaBroken("this replica's database pool is closed")
    for task in background:
        if task.done():
            error = None if task.cancelled() else task.exception()
            raise ReplicaBroken(f"background task {task.get_name()!r} stopped: {error!r}")
