"""Evaluation job speed: shards on 2 Ray tasks at once against 1, same service, same queries.

The evaluate job (`cluster.jobs.evaluate`) ranks a dataset's queries through the running
service's HTTP API in shards, `--workers` Ray tasks at a time, each with `--concurrency`
requests in flight. This times its fan-out (`run_shards`: the same code, tasks and HTTP calls)
with 1 and with 2 workers, interleaved over `--repeats` rounds so a drifting machine load hits
both alike, and reports the median wall time of each and their ratio. Every round must score the
same queries, or the run fails.

Needs a running service (`dtrag up`) holding the dataset's corpus; it joins that service's Ray
when given its job server (run it as a job), else starts a private local Ray for the tasks.

    .venv/bin/python bench/evaluate_workers.py $DATA/scifact [--repeats 3] [--no-actions]

It writes the section "## Evaluation job: workers" of `bench/RESULTS.md`.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from _harness import BENCH, replace_section  # noqa: E402
from cluster.cli.service import add_target_options, service_target  # noqa: E402
from cluster.clients.evaluate import judged_queries  # noqa: E402
from cluster.core.vocabulary import STRATEGIES  # noqa: E402
from cluster.jobs.common import connect_ray  # noqa: E402
from cluster.jobs.evaluate import run_shards, shards  # noqa: E402
from cluster.platform.settings import load_settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight per task")
    parser.add_argument("--shard-size", type=int, default=25)
    parser.add_argument("--no-actions", action="store_true", help="fixed strategies only")
    parser.add_argument("--address", help="Ray cluster for the tasks (default: a private local Ray)")
    add_target_options(parser)
    args = parser.parse_args()
    settings = load_settings()
    url, key = service_target(args, settings)
    queries, qrels = judged_queries(args.dataset)
    work = shards(queries, qrels, args.shard_size)
    connect_ray(args)
    options = {"url": url, "api_key": key, "strategies": list(STRATEGIES), "actions": not args.no_actions,
               "concurrency": args.concurrency}
    run_shards(work[:1], 1, **options)  # warm: task workers, the service's caches
    seconds: dict[int, list[float]] = {1: [], 2: []}
    scored: set[int] = set()
    for _ in range(args.repeats):
        for workers in (1, 2):
            started = time.monotonic()
            rows, failures = run_shards(work, workers, **options)
            seconds[workers].append(time.monotonic() - started)
            if failures:
                raise SystemExit(f"{len(failures)} queries failed, e.g. {next(iter(failures.items()))}")
            scored.add(len(rows))
    if len(scored) != 1:
        raise SystemExit(f"rounds scored different numbers of rows: {scored}")
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    requests = len(queries) * (len(STRATEGIES) + (0 if args.no_actions else 1))
    command = (f".venv/bin/python bench/evaluate_workers.py {args.dataset}"
               + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
               + (f" --shard-size {args.shard_size}" if args.shard_size != 25 else "")
               + (f" --concurrency {args.concurrency}" if args.concurrency != 2 else "")
               + (" --no-actions" if args.no_actions else "")
               + (" --address GCS_ADDRESS" if args.address else ""))
    body = "\n".join([
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {os.cpu_count()} cores; "
        f"1-minute load average {os.getloadavg()[0]:.2f} at the end.", "",
        "Command (from the repository root, with `dtrag up` serving the dataset's corpus"
        + ("; the tasks on its Ray, joined at its GCS address with its token" if args.address else "") + "):", "",
        "```", command, "```", "",
        f"{args.dataset.name}: {len(queries)} judged test queries in {len(work)} shards of {args.shard_size}, "
        f"{requests} `/api/v1/rank` requests per run ({len(STRATEGIES)} fixed strategies"
        + ("" if args.no_actions else " + one every-action ranking per query")
        + f"), {args.concurrency} in flight per task; {args.repeats} rounds, 1 and 2 workers interleaved.", "",
        "| workers | runs (s) | median (s) | queries/s |", "|---:|---|---:|---:|",
        *(f"| {w} | {', '.join(f'{s:.1f}' for s in seconds[w])} | {statistics.median(seconds[w]):.1f} | "
          f"{len(queries) / statistics.median(seconds[w]):.1f} |" for w in (1, 2)), "",
        f"- 2 workers take {two / one:.2f}x the time of 1 ({one / two:.2f}x as fast).",
    ])
    print(body)
    replace_section(BENCH / "RESULTS.md", "## Evaluation job: workers", body)


if __name__ == "__main__":
    main()
