"""Retention of the `experiences` table: rows past an age or a count go, optionally to Parquet first.

What may go is fixed once per run: rows created before `now - max_age`, and rows beyond the
newest `max_rows` (by creation time). Never what the learning actor needs to come back after a
restart (`cluster.actors.learning_state`): it loads its latest checkpoint and replays the
rewards recorded after it, or, when no checkpoint can be restored, the newest `capacity`
rewarded searches of each head. So a row is kept whatever its age when it was created, rewarded
or rated after the latest checkpoint, or is among the newest `capacity` rewarded searches of a
head: pruning can never change what a restarted actor rebuilds.

Rows go in batches, each in one transaction: selected and locked, written to
`export_dir/date=YYYY-MM-DD/` (the UTC day each was created, Hive-style, so pandas and pyarrow
read the folder as one dataset), then deleted. A failed export deletes nothing; an export
whose delete then fails is written again by the next run, so an export may repeat rows but
never lacks one that was deleted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg

from cluster.platform.settings import RetentionSettings

log = logging.getLogger(__name__)

BATCH_ROWS = 20_000

# Per head, the newest rewarded searches: what a rebuild without a checkpoint replays
# (the conditions and order of `_REWARDED_SINCE` in cluster.actors.learning_state).
_PROTECTED = """
(SELECT search_id FROM experiences WHERE reward IS NOT NULL AND context IS NOT NULL
 ORDER BY feedback_at DESC LIMIT $1)
UNION
(SELECT search_id FROM experiences WHERE answer_reward IS NOT NULL
 ORDER BY answer_rated_at DESC LIMIT $1)"""

# The newest row beyond the newest `max_rows`: it and every older one are past the count.
_COUNT_BOUNDARY = """
SELECT created_at, search_id FROM experiences ORDER BY created_at DESC, search_id DESC OFFSET $1 LIMIT 1"""

# $1 age cutoff, $2/$3 count boundary, $4 latest checkpoint, $5 protected ids (all may be NULL).
_PRUNABLE = """
FROM experiences
WHERE (created_at < $1 OR (created_at, search_id) <= ($2::timestamptz, $3::text))
  AND ($4::timestamptz IS NULL OR greatest(created_at, feedback_at, answer_rated_at) < $4)
  AND search_id <> ALL($5::text[])"""


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    max_age: dt.timedelta | None  # None: no age limit
    max_rows: int | None  # None: no count limit
    capacity: int  # the learning actor's replay capacity per head

    @classmethod
    def from_settings(cls, settings: RetentionSettings, capacity: int) -> RetentionPolicy:
        return cls(dt.timedelta(days=settings.max_age_days) if settings.max_age_days else None,
                   settings.max_rows or None, capacity)


@dataclasses.dataclass
class PruneReport:
    deleted: int = 0
    files: list[Path] = dataclasses.field(default_factory=list)
    kept_for_learning: int = 0  # past age or count, kept because a restart of the actor replays them
    latest_checkpoint: dt.datetime | None = None


async def _plan(connection: asyncpg.Connection, policy: RetentionPolicy) -> tuple[Any, ...]:
    """The parameters of `_PRUNABLE`, fixed at the start of a run."""
    now = await connection.fetchval("SELECT now()")
    cutoff = now - policy.max_age if policy.max_age else None
    boundary = (await connection.fetchrow(_COUNT_BOUNDARY, policy.max_rows)
                if policy.max_rows is not None else None)
    checkpoint = await connection.fetchval("SELECT max(created_at) FROM q_table_snapshots")
    protected = [row["search_id"] for row in await connection.fetch(_PROTECTED, policy.capacity)]
    return (cutoff, boundary["created_at"] if boundary else None, boundary["search_id"] if boundary else None,
            checkpoint, protected)


async def prunable_count(connection: asyncpg.Connection, policy: RetentionPolicy) -> tuple[int, int]:
    """(rows a prune would delete now, rows past the limits it would keep for learning)."""
    return await _counts(connection, await _plan(connection, policy))


async def _counts(connection: asyncpg.Connection, plan: tuple[Any, ...]) -> tuple[int, int]:
    past_limits = await connection.fetchval(
        "SELECT count(*) FROM experiences WHERE created_at < $1 OR (created_at, search_id) <= ($2::timestamptz, $3)",
        *plan[:3])
    prunable = await connection.fetchval(f"SELECT count(*) {_PRUNABLE}", *plan)
    return prunable, past_limits - prunable


async def prune_experiences(connection: asyncpg.Connection, policy: RetentionPolicy,
                            export_dir: Path | None = None, batch_rows: int = BATCH_ROWS) -> PruneReport:
    """Delete the rows past the policy's limits (exported to `export_dir` first, if given)."""
    plan = await _plan(connection, policy)
    report = PruneReport(latest_checkpoint=plan[3])
    if plan[0] is None and plan[1] is None:
        return report
    _, report.kept_for_learning = await _counts(connection, plan)
    schema = await arrow_schema(connection) if export_dir is not None else None
    run = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    for batch in itertools.count():
        async with connection.transaction():
            rows = await connection.fetch(
                f"SELECT * {_PRUNABLE} ORDER BY created_at LIMIT {int(batch_rows)} FOR UPDATE", *plan)
            if not rows:
                break
            if export_dir is not None:
                report.files += write_parquet(rows, schema, export_dir, f"experiences-{run}-{batch:05d}")
            report.deleted += int((await connection.execute(
                "DELETE FROM experiences WHERE search_id = ANY($1::text[])",
                [row["search_id"] for row in rows])).split()[-1])
    log.info("experiences pruned", extra={"deleted": report.deleted, "files": len(report.files),
                                          "kept_for_learning": report.kept_for_learning})
    return report


# Arrow types by PostgreSQL type name (arrays are the element's name after "_"); others are
# written as text. One schema for every file, so the folder reads as one dataset.
_ARROW_TYPES = {
    "text": "string", "varchar": "string", "jsonb": "string", "json": "string", "bool": "bool",
    "int2": "int16", "int4": "int32", "int8": "int64", "float4": "float32", "float8": "float64",
}

_COLUMN_TYPES = """
SELECT a.attname AS name, t.typname AS type FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = 'experiences'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""


def _arrow_type(type_name: str) -> Any:
    import pyarrow as pa

    if type_name == "timestamptz":
        return pa.timestamp("us", tz="UTC")
    if type_name.startswith("_"):
        return pa.list_(_arrow_type(type_name[1:]))
    return pa.type_for_alias(_ARROW_TYPES.get(type_name, "string"))


async def arrow_schema(connection: asyncpg.Connection) -> Any:
    """The Arrow schema of an `experiences` row, from the table's column types."""
    import pyarrow as pa

    return pa.schema([(row["name"], _arrow_type(row["type"])) for row in await connection.fetch(_COLUMN_TYPES)])


def write_parquet(rows: list[asyncpg.Record], schema: Any, root: Path, name: str,
                  skipped: dict[str, str] | None = None) -> list[Path]:
    """Write `rows` of `experiences` as `root/date=YYYY-MM-DD/name.parquet`, one file per UTC day.

    A row Arrow cannot hold in `schema` fails the call, unless `skipped` is given: then that
    row is left out and noted there (search id: what is wrong), and the others are written.
    Retention never skips (it deletes what it exported); the export job does.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_day: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_day.setdefault(row["created_at"].astimezone(dt.UTC).date().isoformat(), []).append(row)
    files = []
    for day, day_rows in sorted(by_day.items()):
        try:
            table = _table(day_rows, schema)
        except (pa.ArrowException, TypeError, ValueError):
            if skipped is None:
                raise
            table = _table(_convertible(day_rows, schema, skipped), schema)
        if not table.num_rows:
            continue
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.parquet"
        pq.write_table(table, path)
        files.append(path)
    return files


def _table(rows: list[asyncpg.Record], schema: Any) -> Any:
    import pyarrow as pa

    return pa.table({field.name: [_plain(row[field.name], field.type) for row in rows] for field in schema},
                    schema=schema)


def _convertible(rows: list[asyncpg.Record], schema: Any, skipped: dict[str, str]) -> list[asyncpg.Record]:
    """The rows that convert one by one; the others noted in `skipped`."""
    import pyarrow as pa

    kept = []
    for row in rows:
        try:
            _table([row], schema)
            kept.append(row)
        except (pa.ArrowException, TypeError, ValueError) as error:
            skipped[str(row["search_id"])] = f"{type(error).__name__}: {error}"
    return kept


def _plain(value: Any, arrow_type: Any) -> Any:
    """Values of types Arrow has no column for (a type added to the table later) become text."""
    import pyarrow as pa

    if value is None or not pa.types.is_string(arrow_type) or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)
