"""What every job needs: its command line, settings, a Ray connection, progress and a summary line.

A job is a module `cluster/jobs/NAME.py` run as `python -m cluster.jobs.NAME ...`, locally or
with `ray job submit --working-dir . -- python -m cluster.jobs.NAME ...` (`dtrag jobs submit NAME`
fills that in). A job module defines `add_arguments(parser)` and `run(args, settings) -> dict`
and ends with `if __name__ == "__main__": sys.exit(main("NAME", __doc__, add_arguments, run))`:

- `main` parses the arguments (every job also takes `--address` and `--env-file`), loads the
  settings, runs the job and prints its summary: one last line `summary {json}`, what a caller
  (or a test) reads, whatever logging came before. It returns the exit code: 0, or 1 with an
  `error: ...` line for a failure the user can act on (bad input, a service down).
- `connect_ray(args)` joins the job's cluster when running under `ray job submit` (the job
  supervisor sets RAY_ADDRESS), or `--address`, else starts a private local Ray for the run.
- `progress(total, what)` is a progress bar on stderr that `ray job logs` shows too.

Items that fail inside a job (a malformed row, a rejected request) are counted into the
summary, never fatal: only a failure of the whole job (no dataset, no database) ends it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cluster.platform.errors import ServiceUnavailable
from cluster.platform.runtime import loopback_only_environment
from cluster.platform.settings import Settings, settings_for_command

loopback_only_environment()  # before anything imports ray

Run = Callable[[argparse.Namespace, Settings], dict[str, Any]]
SUMMARY_PREFIX = "summary "


AddArguments = Callable[[argparse.ArgumentParser], None]


def parser(job: str, description: str | None, add_arguments: AddArguments) -> argparse.ArgumentParser:
    """The job's parser: its own arguments, then the ones every job takes."""
    result = argparse.ArgumentParser(prog=f"python -m {__package__}.{job}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(result)
    common = result.add_argument_group("every job")
    common.add_argument("--address", help="Ray cluster to run on (default: the submitting job's cluster "
                        "under `ray job submit`, else a private local Ray)")
    common.add_argument("--env-file", type=Path, help="read KEY=value settings from this file first")
    return result


def connect_ray(args: argparse.Namespace) -> None:
    """Join the job's cluster, `--address`, or start a private local Ray (no dashboard, any free ports)."""
    import ray

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)


def day(text: str) -> dt.datetime:
    """A `--since`/`--until` argument: a UTC date, YYYY-MM-DD, as midnight UTC."""
    try:
        return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def progress(total: int, what: str) -> tqdm:
    """A progress bar on stderr: `with progress(n, "queries") as bar: ... bar.update(k)`."""
    return tqdm(total=total, desc=what, unit="", file=sys.stderr, mininterval=1.0)


def summary_line(job: str, fields: dict[str, Any]) -> str:
    return SUMMARY_PREFIX + json.dumps({"job": job, **fields}, default=str)


def read_summary(output: str) -> dict[str, Any]:
    """The summary a job printed (its last `summary {...}` line), e.g. from `ray job logs`."""
    lines = [line for line in output.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if not lines:
        raise ValueError("no summary line in the job's output")
    return json.loads(lines[-1].removeprefix(SUMMARY_PREFIX))


def main(job: str, description: str | None, add_arguments: AddArguments, run: Run,
         argv: list[str] | None = None) -> int:
    """Parse, load settings, run, print the summary; the exit code."""
    args = parser(job, description, add_arguments).parse_args(argv)
    settings = settings_for_command(args.env_file)
    if settings is None:
        return 2
    try:
        fields = run(args, settings)
    except (ServiceUnavailable, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(summary_line(job, {"status": "failed", "error": str(error)}), flush=True)
        return 1
    print(summary_line(job, {"status": "succeeded", **fields}), flush=True)
    return 0
