"""`dtrag`: bring the cluster up, migrate, ingest, manage keys, back up, evaluate, train, operate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster import __version__
from cluster.cli import backup, db, jobs, service, up
from cluster.clients.operate import OperationFailed
from cluster.platform.errors import ServiceUnavailable
from cluster.platform.migrate import MigrationError
from cluster.platform.runtime import loopback_only_environment
from cluster.platform.settings import SettingsError, settings_for_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrag", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dtrag {__version__}")
    parser.add_argument("--env-file", type=Path, help="read KEY=value settings from this file first")
    commands = parser.add_subparsers(dest="command", required=True)
    up.add_parsers(commands)
    db.add_parsers(commands)
    backup.add_parsers(commands)
    service.add_parsers(commands)
    jobs.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    loopback_only_environment()  # before anything imports ray, which reads it at import
    args = build_parser().parse_args(argv)
    settings = settings_for_command(args.env_file)
    if settings is None:
        return 2
    try:
        return args.handler(args, settings)
    except (ServiceUnavailable, MigrationError, SettingsError, FileNotFoundError, ValueError,
            OperationFailed, db.IngestFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
