"""`dtrag db`, `dtrag ingest`, `dtrag keys`: commands that work on the database directly."""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from pathlib import Path

import asyncpg

from cluster.core.vocabulary import SCOPES
from cluster.data.ingest import IngestReport, ingest
from cluster.platform.api_keys import create_key, list_keys, revoke_key
from cluster.platform.database import DatabaseUnavailable, create_pool, redact, resolve_database_url
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
        # The model loads on the first changed document: a re-run of unchanged data skips it.
        return await ingest(
            pool, path, lambda texts: _embedder().encode(texts, settings.embedding.batch_size),
            show_progress=show_progress,
        )
    finally:
        await pool.close()


def print_ingest_report(report: IngestReport) -> None:
    for error in report.errors[:50]:
        print(f"  line {error.line}: {error.reason}", file=sys.stderr)
    if len(report.errors) > 50:
        print(f"  ... and {len(report.errors) - 50} more malformed lines", file=sys.stderr)
    print(
        f"read {report.read} documents: {report.inserted} inserted, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} malformed lines skipped; "
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
    else:
        asyncio.run(status(url))
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    print_ingest_report(asyncio.run(ingest_collection(with_live_database(settings), Path(args.path))))
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
    db = commands.add_parser("db", help="schema migrations")
    db.add_argument("db_command", choices=["migrate", "status"])
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
