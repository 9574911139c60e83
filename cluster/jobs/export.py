"""Export logged experiences to a Parquet dataset partitioned by date, for offline analysis.

    python -m cluster.jobs.export [--out DIR] [--since 2026-11-01] [--until 2026-12-01]
    dtrag jobs submit export --since 2026-11-01

Every search served while the `experience_replay` flag is on is logged in the `experiences`
table; this writes the rows created in [since, until) (UTC dates; default: all) to
`DIR/date=YYYY-MM-DD/experiences-RUN-NNNNN.parquet` (Hive-style folders, so
`pandas.read_parquet(DIR)` and `ray.data.read_parquet(DIR)` read the folder as one table with a
`date` column). Default DIR: `STATE_DIR/exports/experiences-TIME`; an existing non-empty DIR is
refused, so two runs never mix. The files are those retention writes before it prunes
(`cluster.data.retention`, same writer, same schema), so archives and exports read together.

Schema: one row per logged search, a column per column of `experiences`. The ones offline
evaluation and training read:

    search_id            string     the search (its response's `search_id`)
    created_at           timestamp  when it was served (UTC, microseconds)
    arm                  string     control or treatment
    state_key            string     the query's state label (learners.state_encoder)
    context              list<f32>  the policy's context features (learners.context.FEATURES); null
                                    for rows logged before contexts were stored
    action               int16      index of the served retrieval action (cluster.core.actions)
    strategy             string     its name: lexical, hybrid@W or hybrid@W+prf, or a fixed strategy
    propensity           f32        probability the behaviour policy gave the served action, (0, 1]
    action_probabilities list<f32>  the behaviour policy's probability of every action
    policy_version       int32      version of the policy that served it
    reward               f64        nDCG of the served list minus cost weight x CPU ms; null until feedback
    quality              f64        nDCG of the served list against the feedback; null until feedback
    action_rewards       list<f64>  every action's reward, with graded feedback (full information)
    action_quality       list<f64>  every action's nDCG, with graded feedback
    cost_cpu_ms          f32        CPU of the served action's stages after the lexical one
    action_costs         list<f32>  every action's CPU ms, with graded feedback
    cost_wall_ms         f32        wall time of the same stages
    feedback_at          timestamp  when feedback arrived
    session_id, query, depth, served_doc_ids, strategy_doc_ids, next_state_key, next_context,
    feedback (JSON text), answer_* columns: see the `experiences` table's migrations.

A row Arrow cannot hold in the schema is skipped and counted (`skipped` in the summary, the
first ones named on stderr), never fatal. The summary also counts rows without a context or a
reward, which offline training and evaluation cannot use.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

from cluster.data.retention import BATCH_ROWS, arrow_schema, write_parquet
from cluster.jobs.common import day, main, progress
from cluster.platform.database import resolve_database_url
from cluster.platform.settings import Settings

_RANGE = "created_at >= coalesce($1::timestamptz, '-infinity') AND created_at < coalesce($2::timestamptz, 'infinity')"


async def export(url: str, out: Path, since: dt.datetime | None, until: dt.datetime | None,
                 batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Write the experiences created in [since, until) under `out`; counts for the summary."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        schema = await arrow_schema(connection)
        total = await connection.fetchval(f"SELECT count(*) FROM experiences WHERE {_RANGE}", since, until)
        run = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        skipped: dict[str, str] = {}
        files: list[Path] = []
        counts = {"rows": 0, "without_context": 0, "without_reward": 0}
        with progress(total, "experiences") as bar:
            async with connection.transaction(readonly=True, isolation="repeatable_read"):
                cursor = await connection.cursor(
                    f"SELECT * FROM experiences WHERE {_RANGE} ORDER BY created_at, search_id", since, until)
                for batch in range(sys.maxsize):
                    rows = await cursor.fetch(batch_rows)
                    if not rows:
                        break
                    before = len(skipped)
                    files += write_parquet(rows, schema, out, f"experiences-{run}-{batch:05d}", skipped)
                    kept = [row for row in rows if str(row["search_id"]) not in skipped]
                    counts["rows"] += len(rows) - (len(skipped) - before)
                    counts["without_context"] += sum(row["context"] is None for row in kept)
                    counts["without_reward"] += sum(row["reward"] is None for row in kept)
                    bar.update(len(rows))
    finally:
        await connection.close()
    for search_id, why in list(skipped.items())[:10]:
        print(f"skipped {search_id}: {why}", file=sys.stderr)
    days = sorted({path.parent.name.removeprefix("date=") for path in files})
    return {**counts, "skipped": len(skipped), "files": len(files), "days": len(days),
            "first_day": days[0] if days else None, "last_day": days[-1] if days else None, "out": str(out)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="a new or empty folder (default STATE_DIR/exports/experiences-TIME)")
    parser.add_argument("--since", type=day, help="first UTC date to export, YYYY-MM-DD (default: the oldest)")
    parser.add_argument("--until", type=day, help="UTC date to stop before, YYYY-MM-DD (default: none)")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    out = (args.out or settings.state_dir / "exports" / f"experiences-{time.strftime('%Y%m%dT%H%M%S')}").resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; export into a new folder, so runs never mix")
    if args.since and args.until and args.since >= args.until:
        raise ValueError("--since must be before --until")
    url = resolve_database_url(settings.database.url, settings.state_dir)
    return asyncio.run(export(url, out, args.since, args.until))


if __name__ == "__main__":
    sys.exit(main("export", __doc__, add_arguments, run))
