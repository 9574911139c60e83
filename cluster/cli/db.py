"""`dtrag db`, `dtrag ingest`, `dtrag keys`: commands that work on the database directly."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import asyncpg

from cluster.core.vocabulary import SCOPES
from cluster.data.ingest import Bm25Shape, IngestReport, ingest
from cluster.data.retention import RetentionPolicy, prunable_count, prune_experiences
from cluster.platform.api_keys import create_key, list_keys, revoke_key
from cluster.platform.database import (
    DatabaseUnavailable,
    create_pool,
    redact,
    resolve_database_url,
    unavailable_on_connection_errors,
)
from cluster.platform.migrate import migrate, migration_status
from cluster.platform.settings import Settings


def with_live_database(settings: Settings) -> Settings:
    """Settings pointing at a live database (the embedded one is started if none is set)."""
    return settings.with_database_url(resolve_database_url(settings.database.url, settings.state_dir))


async def connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact(url)}: {error}; check DATABASE_URL"
        ) from error


async def apply_migrations(url: str) -> list[str]:
    connection = await connect(url)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(connection)]
    finally:
        await connection.close()


@functools.cache
def _embedder():
    from serve_app.embedding import TextEmbedder  # torch: loaded only when something is embedded

    return TextEmbedder()


async def ingest_collection(settings: Settings, path: Path, show_progress: bool = True) -> IngestReport:
    """Migrate, then load the collection at `path` into the settings' (live) database."""
    assert settings.database.url
    await apply_migrations(settings.database.url)
    pool = await create_pool(settings.database.url, settings.database)
    try:
        # A lost database ends the run; chunks written so far stay, and a re-run completes it.
        async with unavailable_on_connection_errors(f"ingest {path} (run it again to resume)"):
            # The model loads on the first changed document: a re-run of unchanged data skips it.
            return await ingest(
                pool, path, lambda texts: _embedder().encode(texts, settings.embedding.batch_size),
                show_progress=show_progress,
                bm25=Bm25Shape.of(settings.retrieval),
            )
    finally:
        await pool.close()


class IngestFailed(RuntimeError):
    """`dtrag ingest`, run for another command, failed; it has said why on stderr."""


def ingest_in_child(path: Path, database_url: str, env_file: Path | None) -> None:
    """`dtrag ingest path` in a process of its own, for a caller that lives on (`dtrag up`): the
    embedding model it loads (torch and MiniLM, about 500 MiB) leaves with that process instead of
    staying resident in the caller. It runs in a session of its own, so Ctrl-C reaches only the
    caller, which stops it on the way out (`subprocess.run` kills it on any exception)."""
    command = [sys.executable, "-m", "cluster.cli.main", *(["--env-file", str(env_file)] if env_file else []),
               "ingest", str(path)]
    result = subprocess.run(command, env={**os.environ, "DATABASE_URL": database_url}, start_new_session=True)
    if result.returncode != 0:
        raise IngestFailed(f"loading {path} failed (`dtrag ingest` exited with {result.returncode}; see above)")


def print_ingest_report(report: IngestReport) -> None:
    """Each skipped record on stderr (the first 50), then one summary line on stdout."""
    for error in report.errors[:50]:
        print(f"  line {error.line}: {error.reason}", file=sys.stderr)
    if len(report.errors) > 50:
        print(f"  ... and {len(report.errors) - 50} more skipped records", file=sys.stderr)
    kinds = ", ".join(f"{count} {kind}" for kind, count in report.skipped_by_kind.items())
    print(
        f"read {report.read} documents: {report.inserted} inserted, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} skipped{f' ({kinds})' if kinds else ''}; "
        f"statistics {'refreshed' if report.statistics_refreshed else 'already current'}; "
        f"{report.seconds:.1f} s, {report.docs_per_second:.1f} docs/s"
    )


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    async def status(url: str) -> None:
        connection = await connect(url)
        try:
            for entry in await migration_status(connection):
                applied = entry.applied_at.isoformat(timespec="seconds") if entry.applied_at else "pending"
                print(f"{entry.migration.version:04d}_{entry.migration.name:<24} {applied}")
        finally:
            await connection.close()

    url = with_live_database(settings).database.url
    assert url
    if args.db_command == "migrate":
        applied = asyncio.run(apply_migrations(url))
        print(f"applied {', '.join(applied)}" if applied else "database is up to date")
    elif args.db_command == "prune":
        return asyncio.run(prune(args, settings, url))
    else:
        asyncio.run(status(url))
    return 0


async def prune(args: argparse.Namespace, settings: Settings, url: str) -> int:
    """`dtrag db prune`: the retention settings, or the limits given, applied once now."""
    limits = dataclasses.replace(settings.retention, **{
        name: value for name, value in (("max_age_days", args.max_age_days), ("max_rows", args.max_rows),
                                        ("export_dir", args.export)) if value is not None})
    if limits.max_age_days < 0 or limits.max_rows < 0:
        raise ValueError("--max-age-days and --max-rows must be >= 0 (0 turns that limit off)")
    policy = RetentionPolicy.from_settings(limits, settings.learning.core.capacity)
    await apply_migrations(url)
    connection = await connect(url)
    try:
        if args.dry_run:
            prunable, kept = await prunable_count(connection, policy)
            print(f"would delete {prunable} experiences; {kept} past the limits kept for the learning actor")
            return 0
        export = Path(limits.export_dir) if limits.export_dir else None
        report = await prune_experiences(connection, policy, export)
    finally:
        await connection.close()
    exported = f", exported first to {len(report.files)} Parquet files under {export}" if export else ""
    print(f"deleted {report.deleted} experiences{exported}; "
          f"{report.kept_for_learning} past the limits kept for the learning actor")
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """0 when the file's documents are stored, bad records skipped; 1 when none could be."""
    report = asyncio.run(ingest_collection(with_live_database(settings), Path(args.path)))
    print_ingest_report(report)
    if report.stored == 0:
        print(f"error: no document of {args.path} could be ingested", file=sys.stderr)
        return 1
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def run(url: str) -> int:
        connection = await connect(url)
        try:
            await migrate(connection)
            if args.keys_command == "create":
                print(await create_key(connection, args.name, args.scope or ["search"]))
            elif args.keys_command == "list":
                for info in await list_keys(connection):
                    state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "active"
                    print(f"{info.key_id}  {info.name:<20} {','.join(info.scopes):<14} {state}")
            elif not await revoke_key(connection, args.key_id):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            return 0
        finally:
            await connection.close()

    url = with_live_database(settings).database.url
    assert url
    return asyncio.run(run(url))


def add_parsers(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="schema migrations and retention")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("migrate", help="apply pending migrations")
    db_commands.add_parser("status", help="list migrations and when each was applied")
    prune_parser = db_commands.add_parser(
        "prune", help="delete experiences past the retention limits (DTRAG_RETENTION_*), now")
    prune_parser.add_argument("--max-age-days", type=float, help="instead of DTRAG_RETENTION_MAX_AGE_DAYS (0: none)")
    prune_parser.add_argument("--max-rows", type=int, help="instead of DTRAG_RETENTION_MAX_ROWS (0: none)")
    prune_parser.add_argument("--export", metavar="DIR",
                              help="write the rows to DIR/date=YYYY-MM-DD/*.parquet before deleting them")
    prune_parser.add_argument("--dry-run", action="store_true", help="only count what would go")
    db.set_defaults(handler=cmd_db)

    ingest_parser = commands.add_parser("ingest", help="load a BEIR folder or a JSONL file of documents")
    ingest_parser.add_argument("path", help="a BEIR folder (corpus.jsonl[.gz]) or a .jsonl[.gz] file")
    ingest_parser.set_defaults(handler=cmd_ingest)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", default="default", help="a label for the key")
    create.add_argument("--scope", action="append", choices=SCOPES, help="repeat for several")
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)
