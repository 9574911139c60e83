"""The database connections the whole service may hold at once, checked at start against the server.

Every ingress and arm replica has a pool of up to `DB_POOL_SIZE + DB_MAX_OVERFLOW` connections,
and an autoscaled deployment is counted at its `max_replicas` (what it may reach under load);
the actors open short ones; an operator's command beside the running service (ingest, prune)
has a pool of its own. Over the server's `max_connections`, the last ones to connect fail at
random under load; so `dtrag up` and `serve deploy` refuse to start and name what to lower.
"""

from __future__ import annotations

import dataclasses

import asyncpg

from cluster.core.deployments import ARM_CONTROL, ARM_TREATMENT, INGRESS
from cluster.platform.database import DatabaseUnavailable, redact
from cluster.platform.serve_config import most_replicas
from cluster.platform.settings import Settings, SettingsError

# LearningState: its load-then-checkpoint thread, its retention thread and an operator's reset,
# each one short connection at a time; RolloutControl: its store thread.
ACTOR_CONNECTIONS = 4

_LIMITS = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
       + coalesce(current_setting('reserved_connections', true), '0')::int AS reserved"""


class ConnectionBudgetExceeded(SettingsError):
    """The settings would open more connections than the server accepts; the message says what to lower."""


@dataclasses.dataclass(frozen=True)
class BudgetPart:
    what: str
    connections: int


def connection_budget(settings: Settings) -> list[BudgetPart]:
    """Each kind of process and the most connections it may hold at once."""
    pool = settings.database.pool_size + settings.database.max_overflow
    ingress = most_replicas(settings, INGRESS)
    arms = most_replicas(settings, ARM_CONTROL) + most_replicas(settings, ARM_TREATMENT)
    return [
        BudgetPart(f"ingress {ingress} x {pool}", ingress * pool),
        BudgetPart(f"arms {arms} x {pool}", arms * pool),
        BudgetPart("actors", ACTOR_CONNECTIONS),
        BudgetPart("a command beside the service", pool),
    ]


def check_connection_budget(settings: Settings, max_connections: int, reserved: int) -> int:
    """The connections needed; `ConnectionBudgetExceeded` when they exceed what the server allows."""
    parts = connection_budget(settings)
    needed = sum(part.connections for part in parts)
    available = max_connections - reserved
    if needed <= available:
        return needed
    database = settings.database
    pooled_processes = sum(most_replicas(settings, name) for name in (INGRESS, ARM_CONTROL, ARM_TREATMENT)) + 1
    fitting_pool = (available - ACTOR_CONNECTIONS) // pooled_processes
    lower_pool = (f"lower DB_POOL_SIZE + DB_MAX_OVERFLOW (now {database.pool_size} + {database.max_overflow} "
                  f"per process) to at most {fitting_pool} in all, or " if fitting_pool >= 1 else "")
    raise ConnectionBudgetExceeded(
        f"the service may open {needed} database connections ({', '.join(p.what + ': ' + str(p.connections) for p in parts)}) "
        f"but the server accepts {available} (max_connections={max_connections}, {reserved} reserved); "
        f"{lower_pool}run fewer replicas (max_replicas of the arms in configs/serve.yaml, or a fixed "
        "DTRAG_INGRESS_REPLICAS, DTRAG_PIPELINE_REPLICAS, DTRAG_TREATMENT_REPLICAS), or raise max_connections "
        "on the server"
    )


async def verify_connection_budget(url: str, settings: Settings) -> int:
    """Read the server's limits and check the settings against them (one short connection)."""
    try:
        connection = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {redact(url)} to read max_connections: "
                                  f"{error}; check DATABASE_URL and that the server is running") from error
    try:
        limits = await connection.fetchrow(_LIMITS)
    finally:
        await connection.close()
    return check_connection_budget(settings, limits["max_connections"], limits["reserved"])
