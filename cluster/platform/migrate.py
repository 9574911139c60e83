"""Versioned SQL migrations: `cluster/migrations/NNNN_name.sql`, applied in order, each once.

Each file runs in its own transaction together with its row in `schema_migrations`, under an
advisory lock, so two processes migrating at once cannot both apply it. A file changed after it
was applied is an error rather than a silent divergence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import datetime
from importlib import resources

import asyncpg

_LOCK_ID = 0x6474726167  # "dtrag": serialises migrators across processes
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class MigrationStatus:
    migration: Migration
    applied_at: datetime | None


class MigrationError(RuntimeError):
    """The database's recorded migrations disagree with the files shipped here."""


def available_migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found = []
    for entry in resources.files("cluster.platform").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


async def _ensure_table(connection: asyncpg.Connection) -> None:
    await connection.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer PRIMARY KEY,
               name       text NOT NULL,
               checksum   text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )


async def migration_status(connection: asyncpg.Connection) -> list[MigrationStatus]:
    """Every shipped migration with the time it was applied (None when pending)."""
    await _ensure_table(connection)
    rows = await connection.fetch("SELECT version, checksum, applied_at FROM schema_migrations")
    applied = {row["version"]: row for row in rows}
    shipped = available_migrations()
    unknown = set(applied) - {m.version for m in shipped}
    if unknown:
        raise MigrationError(
            f"the database has migrations {sorted(unknown)} that this version does not ship; "
            "upgrade dtrag before using this database"
        )
    statuses = []
    for migration in shipped:
        row = applied.get(migration.version)
        if row is not None and row["checksum"] != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} was changed after it was "
                "applied; add a new migration instead of editing an applied one"
            )
        statuses.append(MigrationStatus(migration, row["applied_at"] if row else None))
    return statuses


async def migrate(connection: asyncpg.Connection) -> list[Migration]:
    """Apply pending migrations in order; return those applied (empty when up to date)."""
    await connection.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        applied = []
        for status in await migration_status(connection):
            if status.applied_at is not None:
                continue
            migration = status.migration
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration)
        return applied
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
