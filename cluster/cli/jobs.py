"""`dtrag jobs submit NAME [ARGS...]` and `dtrag jobs list`: Ray jobs on the cluster `dtrag up` started.

A thin wrapper over Ray's `JobSubmissionClient`: it fills in the job server's address
(127.0.0.1 and DTRAG_DASHBOARD_PORT), the token `dtrag up` wrote into the state folder, and the
project folder as the working directory, then runs `python -m cluster.jobs.NAME ARGS...`, prints
the job id and follows its logs. What it submits is an ordinary Ray job: `ray job status ID`,
`ray job logs ID` and `ray job stop ID` work on it (with RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH set, as `dtrag up` prints).

The upload leaves out what Ray leaves out by default (`.git`, `.venv`, `__pycache__`), what
`.gitignore` names (the state folder `.dtrag/`, `bench/out/`), and the state folder wherever it is.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

from cluster.platform.ray_token import auth_token_file, read_auth_token
from cluster.platform.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_NOT_JOBS = {"common"}


def job_names() -> list[str]:
    """The modules of `cluster.jobs` that are jobs."""
    folder = PROJECT_ROOT / "cluster" / "jobs"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem not in _NOT_JOBS)


def _client(args: argparse.Namespace, settings: Settings) -> Any:
    from ray.job_submission import JobSubmissionClient

    if not settings.ray.dashboard_port and not args.address:
        raise ValueError("DTRAG_DASHBOARD_PORT is 0, so the cluster runs no job server; pass --address")
    address = args.address or f"http://127.0.0.1:{settings.ray.dashboard_port}"
    token = read_auth_token(args.token_file or auth_token_file(settings.state_dir))
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except (ConnectionError, RuntimeError) as error:  # Ray raises ConnectionError for a refused port
        raise ValueError(f"no Ray job server answers at {address} ({error}); is `dtrag up` running "
                         "with this DTRAG_STATE_DIR and DTRAG_DASHBOARD_PORT?") from None


def _excludes(settings: Settings) -> list[str]:
    """Upload exclusions beyond Ray's defaults and .gitignore: the state folder wherever it is."""
    try:
        return ["/" + settings.state_dir.relative_to(PROJECT_ROOT).as_posix() + "/"]
    except ValueError:  # outside the project: never uploaded
        return []


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    if args.name not in job_names():
        raise ValueError(f"unknown job {args.name!r}; jobs: {', '.join(job_names())}")
    if importlib.util.find_spec(f"cluster.jobs.{args.name}") is None:
        raise ValueError(f"cluster.jobs.{args.name} is not importable from {PROJECT_ROOT}")
    client = _client(args, settings)
    entrypoint = shlex.join(["python", "-m", f"cluster.jobs.{args.name}", *args.job_args])
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": _excludes(settings)})
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job runs on. `ray job stop {job_id}` stops it", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status.lower()}" + (f": {info.message}" if info.message else ""))
    return 0 if info.status == "SUCCEEDED" else 1


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    jobs = sorted(_client(args, settings).list_jobs(), key=lambda job: job.start_time or 0)
    for job in jobs:
        started = dt.datetime.fromtimestamp(job.start_time / 1000).isoformat(" ", "seconds") if job.start_time else "-"
        print(f"{job.submission_id or job.job_id}\t{job.status.lower()}\t{started}\t{job.entrypoint}")
    if not jobs:
        print("no jobs")
    return 0


def add_parsers(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="submit and list Ray jobs on the running cluster")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = job_commands.add_parser(
        "submit", help="run `python -m cluster.jobs.NAME ARGS...` as a Ray job; prints its id, follows its logs",
        description=f"jobs: {', '.join(job_names())}; `python -m cluster.jobs.NAME --help` for each one's arguments")
    submit.add_argument("name", metavar="NAME", help=", ".join(job_names()))
    submit.add_argument("job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the job's own arguments")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    listing = job_commands.add_parser("list", help="jobs of the cluster, oldest first")
    for parser in (submit, listing):
        parser.add_argument("--address", help="job server (default http://127.0.0.1:DTRAG_DASHBOARD_PORT)")
        parser.add_argument("--token-file", type=Path, help="default: STATE_DIR/ray_auth_token")
    submit.set_defaults(handler=cmd_submit)
    listing.set_defaults(handler=cmd_list)
