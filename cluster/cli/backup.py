"""`dtrag backup PATH`, `dtrag restore PATH`: the whole database in pg_dump's custom format.

Documents, API keys, experiences, checkpoints and rollout state all live in the one database,
so one archive holds them all. The embedded server is backed up with its own binaries (they
match its version), and started for the command and stopped after it if `dtrag up` is not
running (restore refuses to run beside `dtrag up`); an external `DATABASE_URL` with the client
programs on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.cli.db import connect
from cluster.platform import pg_tools
from cluster.platform.database import redact
from cluster.platform.embedded import bin_dir, owned_embedded, pgdata_dir, running_postmaster, start_embedded
from cluster.platform.settings import Settings

_USER_TABLES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1
"""


@contextlib.contextmanager
def _database(settings: Settings, purpose: str, exclusive: bool) -> Iterator[tuple[str, Path | None]]:
    """The database's URL and the folder of the client programs for it (None: PATH).

    The embedded server is joined if it runs (`dtrag up`) and `exclusive` is not asked for;
    otherwise this command claims the state folder, starts the server and stops it afterwards.
    """
    if settings.database.url:
        yield settings.database.url, None
    elif not exclusive and running_postmaster(pgdata_dir(settings.state_dir)):
        yield start_embedded(settings.state_dir), bin_dir()
    else:
        with owned_embedded(settings.state_dir, purpose) as url:
            yield url, bin_dir()


def _progress(table: str) -> None:
    print(f"  {table}", flush=True)


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.path)
    if path.exists():
        raise ValueError(f"{path} exists: choose a new path (a backup never overwrites one)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder {path.parent}")
    with _database(settings, "dtrag backup", exclusive=False) as (url, tools):
        started = time.monotonic()
        pg_dump = pg_tools.program("pg_dump", tools)
        print(f"backing up {redact(url)} to {path} with {pg_tools.version(pg_dump)}", flush=True)
        pg_tools.dump(url, path, tools, _progress)
    print(f"backup written: {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.monotonic() - started:.1f} s)")
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise FileNotFoundError(f"no such backup {path}")
    with _database(settings, "dtrag restore", exclusive=True) as (url, tools):
        tables = pg_tools.archive_tables(path, tools)
        existing = asyncio.run(_user_tables(url))
        if existing and not args.clean:
            raise ValueError(
                f"{redact(url)} is not empty ({len(existing)} tables: {', '.join(existing[:8])}"
                f"{', ...' if len(existing) > 8 else ''}): restore into an empty database, or pass "
                "--clean to replace what the backup holds (its tables lose every row written since)"
            )
        started = time.monotonic()
        pg_restore = pg_tools.program("pg_restore", tools)
        print(f"restoring {path} ({len(tables)} tables) into {redact(url)} with "
              f"{pg_tools.version(pg_restore)}{', replacing existing objects' if existing else ''}",
              flush=True)
        pg_tools.restore(url, path, tools, clean=args.clean, progress=_progress)
        print(f"restored {len(tables)} tables in {time.monotonic() - started:.1f} s", flush=True)
    return 0


async def _user_tables(url: str) -> list[str]:
    connection = await connect(url)
    try:
        return [row[0] for row in await connection.fetch(_USER_TABLES)]
    finally:
        await connection.close()


def add_parsers(commands: argparse._SubParsersAction) -> None:
    backup = commands.add_parser("backup", help="write the whole database to PATH (pg_dump custom format)")
    backup.add_argument("path", help="the archive to write; must not exist")
    backup.set_defaults(handler=cmd_backup)

    restore = commands.add_parser(
        "restore", help="load a `dtrag backup` archive, in one transaction (stop `dtrag up` first)")
    restore.add_argument("path", help="an archive written by `dtrag backup`")
    restore.add_argument("--clean", action="store_true",
                         help="restore into a database that is not empty, replacing the objects the archive holds")
    restore.set_defaults(handler=cmd_restore)
