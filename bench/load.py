"""Load benchmark: the Ray Serve app against the same pipeline in one plain uvicorn process.

Sends `--requests` searches (POST /api/v1/search/, final_topk 10, queries cycled from the
dataset's queries.jsonl) from `--concurrency` closed-loop clients (like `ab -n 1000 -c 10`),
after an uncounted warm-up, to each target in turn, on the same machine and database:

- `serve`: the Serve app with the default settings, behind Serve's own HTTP proxy;
- `serve-haproxy`: the same app on a Ray started with `RAY_SERVE_ENABLE_HA_PROXY=1`
  (Ray 2.56+: HAProxy listens on the HTTP port and forwards to the ingress replica's own HTTP
  server, with no Python proxy in between);
- `serve-throughput-optimized`: the default app on a Ray started with Serve's
  `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (gRPC between deployments, user code and router on the
  replica's main loop, buffered request logs, frozen GC);
- `serve-unbatched`: the default app with `embedding.max_batch_size = 1`;
- `uvicorn`: `python -m serve_app.standalone`, one process, no Ray.

Machines drift by 10-20% over minutes, so the whole set runs `--rounds` times, each round
measuring uvicorn first: a ratio is taken within a round, and the table reports every round's.

Before a Serve target is measured, the learners must have run out of work (a restored replay
gives them a backlog that would otherwise be counted as the cost of searches), and the CPU of
every process is reported by role (proxy, ingress, arm, embedder, PostgreSQL, ...), so the
table shows where a search's CPU goes.

The state folder must already hold an ingested collection. The script starts the embedded
PostgreSQL, Ray, Serve and the uvicorn process itself, and stops them before it exits:

    .venv/bin/python bench/load.py --state-dir /tmp/bench-state --dataset $DATA/scifact

Ray workers run at niceness 0 here (Ray's default is 15, uvicorn's 0), so both sides have the
same CPU priority. HAProxy's stats and metrics listeners bind every interface (Ray's template;
requests still go over loopback only). It prints req/s and latency percentiles per target,
writes a latency plot (`bench/results/load_latency.png`) and the section "## Load: Serve vs one
uvicorn process" of `bench/RESULTS.md`, and exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import itertools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import numpy as np
import psutil
from tqdm import tqdm

from _harness import (
    BENCH,
    REPO,
    cluster_processes,
    deploy_app,
    machine_busy_seconds,
    process_cpu_seconds,
    ray_serve,
    replace_section,
    revoke,
    wait_healthy,
)
from cluster.data.beir import load_queries
from cluster.data.corpus import sample_corpus_dir
from cluster.platform.api_keys import create_key
from cluster.platform.database import resolve_database_url
from cluster.platform.migrate import migrate
from cluster.platform.runtime import loopback_only_environment
from cluster.platform.settings import Settings, load_settings

SECTION = "## Load: Serve vs one uvicorn process"
FINAL_TOPK = 10
REQUEST_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LoadResult:
    target: str
    latencies_ms: np.ndarray  # of the successful requests
    errors: list[str]  # one message per failed or unsent request
    seconds: float
    service_cpu_s: float  # CPU time of the serving processes and PostgreSQL during the run
    other_cpu_s: float  # CPU time of everything else on the machine, the load generator excluded
    cpu_by_role: dict[str, float]  # the service's CPU seconds, by process role

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    @property
    def service_cpu_ms_per_request(self) -> float:
        return 1000 * self.service_cpu_s / max(len(self.latencies_ms) + len(self.errors), 1)

    @property
    def other_cpu_percent(self) -> float:
        """Share of the machine's cores that other work used while this target was measured."""
        return 100 * self.other_cpu_s / (self.seconds * psutil.cpu_count())

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    @classmethod
    def pooled(cls, results: Sequence[LoadResult]) -> LoadResult:
        """One target's rounds as one run: every request, all the time and all the CPU."""
        by_role: collections.Counter[str] = collections.Counter()
        for r in results:
            by_role.update(r.cpu_by_role)
        return cls(results[0].target, np.concatenate([r.latencies_ms for r in results]),
                   [e for r in results for e in r.errors], sum(r.seconds for r in results),
                   sum(r.service_cpu_s for r in results), sum(r.other_cpu_s for r in results), dict(by_role))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True, help="an ingested DTRAG_STATE_DIR")
    parser.add_argument("--dataset", type=Path, default=sample_corpus_dir(),
                        help="a folder with queries.jsonl (default: the sample corpus)")
    parser.add_argument("--requests", type=int, default=1000, help="counted requests per target and round")
    parser.add_argument("--rounds", type=int, default=3, help="times every target is measured")
    parser.add_argument("--targets", nargs="+", choices=SERVE_TARGETS, default=list(SERVE_TARGETS),
                        help="the Serve targets to measure (uvicorn always is)")
    parser.add_argument("--concurrency", type=int, default=10, help="closed-loop clients")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests first")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="per target: requests not started by then count as failed")
    parser.add_argument("--serve-port", type=int, default=8100)
    parser.add_argument("--uvicorn-port", type=int, default=8101)
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "load_latency.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


# --- CPU accounting ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment."""

    service: dict[int, float]  # per serving process: Ray or uvicorn, and PostgreSQL
    roles: dict[int, str]  # per serving process
    own: float  # this process: the load generator (and the idle Ray driver)
    machine: float  # all cores, busy time


def sample_cpu(state_dir: Path | None) -> CpuSample:
    """Serving processes are this process's descendants (Ray's, or the uvicorn process) and, given
    the state folder, its embedded PostgreSQL with its backends (`cluster_processes`)."""
    own = psutil.Process()
    roles = cluster_processes(state_dir, own)
    del roles[own.pid]
    if state_dir is not None and "postgres" not in roles.values():
        raise RuntimeError(f"no PostgreSQL server runs on {state_dir}: its CPU would go uncounted")
    service: dict[int, float] = {}
    for pid in roles:
        with contextlib.suppress(psutil.Error):  # a process may exit meanwhile
            service[pid] = process_cpu_seconds(psutil.Process(pid))
    return CpuSample(service, {pid: roles[pid] for pid in service}, process_cpu_seconds(own), machine_busy_seconds())


def cpu_between(before: CpuSample, after: CpuSample) -> tuple[float, float, dict[str, float]]:
    """CPU seconds used between the samples: by the serving processes, by all other work, and the
    first by role."""
    by_role: collections.Counter[str] = collections.Counter()
    for pid, seconds in after.service.items():
        by_role[after.roles[pid]] += seconds - before.service.get(pid, 0.0)
    service = sum(by_role.values())
    other = after.machine - before.machine - service - (after.own - before.own)
    return service, max(other, 0.0), dict(by_role)


# --- the load generator ---------------------------------------------------------------------


async def _search(client: httpx.AsyncClient, query: str) -> str | None:
    """Send one search; None on success, else what went wrong."""
    try:
        response = await client.post("/api/v1/search/", json={"q": query, "final_topk": FINAL_TOPK})
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        hits = len(response.json()["hits"])
    except (ValueError, KeyError) as error:
        return f"malformed response body: {error!r}"
    return None if hits == FINAL_TOPK else f"{hits} hits instead of {FINAL_TOPK}"


async def _closed_loop(
    client: httpx.AsyncClient, queries: Sequence[str], concurrency: int, deadline: float,
    progress: tqdm | None = None,
) -> tuple[list[float], list[str]]:
    """Each of `concurrency` workers sends its next query as soon as its last one is answered.

    Returns the latencies (ms) of the successes and one message per failure; queries not
    started before `deadline` (a `time.monotonic()` value) count as failures.
    """
    pending = iter(queries)  # shared: workers take turns, and asyncio never preempts next()
    latencies: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        for query in pending:
            if time.monotonic() > deadline:
                errors.append("not sent: time limit reached")
            else:
                started = time.perf_counter()
                error = await _search(client, query)
                if error is None:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors.append(error)
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def run_load(
    target: str, url: str, api_key: str, queries: Sequence[str], args: argparse.Namespace
) -> LoadResult:
    """Warm up, then send `args.requests` counted searches (queries cycled) and time them."""
    cycled = list(itertools.islice(itertools.cycle(queries), args.warmup + args.requests))
    warmup, counted = cycled[: args.warmup], cycled[args.warmup :]
    async with httpx.AsyncClient(
        base_url=url,
        headers={"X-API-Key": api_key},
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_connections=args.concurrency),
    ) as client:
        deadline = time.monotonic() + args.max_seconds
        _, warmup_errors = await _closed_loop(client, warmup, args.concurrency, deadline)
        if warmup_errors:
            raise RuntimeError(f"{target}: warm-up failed: {warmup_errors[0]}")
        with tqdm(total=len(counted), desc=target, unit="req") as progress:
            cpu_before, started = sample_cpu(args.state_dir), time.perf_counter()
            latencies, errors = await _closed_loop(client, counted, args.concurrency, deadline, progress)
            seconds, cpu_after = time.perf_counter() - started, sample_cpu(args.state_dir)
    return LoadResult(target, np.array(latencies), errors, seconds, *cpu_between(cpu_before, cpu_after))


# --- what is measured -------------------------------------------------------------------------


@contextlib.contextmanager
def standalone_server(settings: Settings, port: int, log_path: Path) -> Iterator[str]:
    """`python -m serve_app.standalone` on 127.0.0.1:`port`; yields its URL, stops it after."""
    assert settings.database.url
    environment = {
        **os.environ,
        "DATABASE_URL": settings.database.url,
        "DTRAG_HTTP_HOST": "127.0.0.1",
        "DTRAG_HTTP_PORT": str(port),
    }
    with log_path.open("wb") as log, serving([sys.executable, "-m", "serve_app.standalone"], port,
                                             env=environment, stdout=log, stderr=subprocess.STDOUT) as url:
        yield url


@contextlib.contextmanager
def serving(command: list[str], port: int, **popen: Any) -> Iterator[str]:
    """Run `command`, a server on 127.0.0.1:`port`, until it answers /health; yield its URL, stop it after."""
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, cwd=REPO, **popen)
    try:
        wait_healthy(url, HEALTH_TIMEOUT_S, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _with_connection(url: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    connection = await asyncpg.connect(url)
    try:
        return await action(connection)
    finally:
        await connection.close()


def create_bench_key(url: str) -> str:
    """A search-scoped key for this run, after any pending migrations (as `dtrag up` applies).

    Fails early if the database holds no documents.
    """

    async def action(connection: asyncpg.Connection) -> str:
        await migrate(connection)
        if not await connection.fetchval("SELECT count(*) FROM documents"):
            raise SystemExit("the state folder's database has no documents: run `dtrag ingest` first")
        return await create_key(connection, "bench-load", ["search"])

    return asyncio.run(_with_connection(url, action))


def wait_until_learning_idle(poll_s: float = 3.0) -> tuple[int, float]:
    """Until the learners have nothing left to learn from: no head's sample count moves between polls.

    A learner that finds nothing waits at most 2 s before asking again (`LearnerDriver`). Returns
    the samples learned meanwhile and the seconds it took.
    """
    import ray

    from cluster.actors.start import learning_state

    actor = learning_state()

    def sampled() -> int:
        return sum(report["counters"]["sampled"] for report in ray.get(actor.model.remote()).values())

    started, first = time.perf_counter(), sampled()
    last, current = None, first
    with tqdm(desc="learning backlog", unit="sample") as progress:
        while current != last:
            time.sleep(poll_s)
            last, current = current, sampled()
            progress.update(current - last)
    return current - first, time.perf_counter() - started - poll_s  # the last poll saw no change


@contextlib.contextmanager
def ray_environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` in this process's environment, which the Ray it starts passes to every worker."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Serve targets: the environment of the Ray they run on, and how their settings differ.
SERVE_TARGETS: dict[str, tuple[dict[str, str], str]] = {
    "serve": ({}, "default"),
    "serve-haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, "default"),
    "serve-throughput-optimized": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, "default"),
    "serve-unbatched": ({}, "unbatched"),
}


def measure_round(settings: Settings, key: str, queries: Sequence[str], args: argparse.Namespace) -> list[LoadResult]:
    """uvicorn first (before Ray exists, so nothing else competes for the cores), then each Serve
    target; targets that share a Ray environment share one Ray."""
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    with standalone_server(settings, args.uvicorn_port, args.plot.parent / "load_uvicorn.log") as url:
        uvicorn_result = asyncio.run(run_load("uvicorn", url, key, queries, args))
    variants = {"default": settings, "unbatched": dataclasses.replace(
        settings, embedding=dataclasses.replace(settings.embedding, max_batch_size=1))}
    by_environment: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for target in args.targets:
        by_environment.setdefault(tuple(sorted(SERVE_TARGETS[target][0].items())), []).append(target)
    serve_results = []
    for variables, targets in by_environment.items():
        with ray_environment(dict(variables)), ray_serve(settings) as url:
            for target in targets:
                deploy_app(variants[SERVE_TARGETS[target][1]], url, HEALTH_TIMEOUT_S)
                samples, seconds = wait_until_learning_idle()
                if samples:
                    args.backlogs.append(f"{target}: {samples:,} samples in {seconds:.0f} s "
                                         f"({samples / max(seconds, 1e-9):,.0f} samples/s)")
                serve_results.append(asyncio.run(run_load(target, url, key, queries, args)))
    return [*serve_results, uvicorn_result]


# --- reporting --------------------------------------------------------------------------------


def format_table(results: Sequence[LoadResult], baseline: LoadResult) -> str:
    lines = [
        "| target | req/s | p50 ms | p95 ms | p99 ms | errors | req/s vs uvicorn | p50 vs uvicorn "
        "| server CPU ms/req | other work, % of cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.requests_per_second:.1f} | {r.percentile(50):.0f} | "
            f"{r.percentile(95):.0f} | {r.percentile(99):.0f} | {len(r.errors)} | "
            f"{r.requests_per_second / baseline.requests_per_second:.2f} | "
            f"{r.percentile(50) / baseline.percentile(50):.2f} | "
            f"{r.service_cpu_ms_per_request:.0f} | {r.other_cpu_percent:.0f} |"
        )
    return "\n".join(lines)


def format_rounds(rounds: Sequence[Sequence[LoadResult]], first: int = 1) -> str:
    """Each round's searches per second, and each Serve target's against that round's uvicorn."""
    targets = [r.target for r in rounds[0]]
    lines = ["| round | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for number, results in enumerate(rounds, first):
        baseline = results[-1].requests_per_second
        lines.append(f"| {number} | " + " | ".join(
            f"{r.requests_per_second:.1f}" + ("" if r is results[-1] else f" ({r.requests_per_second / baseline:.2f}x)")
            for r in results) + " |")
    return "\n".join(lines)


def format_cpu_by_role(results: Sequence[LoadResult], min_ms: float = 0.5) -> str:
    """Server CPU ms per request by process role, one column per target; roles under `min_ms`
    everywhere are summed into one row."""
    per_request = [{role: 1000 * seconds / max(len(r.latencies_ms) + len(r.errors), 1)
                    for role, seconds in r.cpu_by_role.items()} for r in results]
    roles = sorted({role for costs in per_request for role in costs},
                   key=lambda role: -max(costs.get(role, 0.0) for costs in per_request))
    shown = [role for role in roles if max(costs.get(role, 0.0) for costs in per_request) >= min_ms]
    lines = ["| process | " + " | ".join(r.target for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for role in shown:
        lines.append(f"| {role} | " + " | ".join(f"{costs.get(role, 0.0):.1f}" for costs in per_request) + " |")
    rest = [sum(v for role, v in costs.items() if role not in shown) for costs in per_request]
    lines.append("| everything else | " + " | ".join(f"{v:.1f}" for v in rest) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(costs.values()):.1f}" for costs in per_request) + " |")
    return "\n".join(lines)


def plot_latencies(results: Sequence[LoadResult], path: Path) -> None:
    """Histogram and cumulative distribution of each target's latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = np.concatenate([r.latencies_ms for r in results])
    if not len(everything):
        return
    bins = np.linspace(0, np.percentile(everything, 99.5), 80)
    figure, (histogram, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        label = f"{r.target} (p50 {r.percentile(50):.0f} ms)"
        histogram.hist(r.latencies_ms, bins=bins, histtype="step", linewidth=1.5, label=label)
        ordered = np.sort(r.latencies_ms)
        cdf.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
    histogram.set(xlabel="latency (ms)", ylabel="requests", title="Latency histogram (to p99.5)")
    cdf.set(xlabel="latency (ms)", ylabel="fraction of requests", title="Cumulative distribution")
    cdf.grid(alpha=0.3)
    histogram.legend()
    figure.suptitle(f"POST /api/v1/search/, {len(results[0].latencies_ms) + len(results[0].errors)} "
                    "requests, closed loop")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def section_body(rounds_table: str, table: str, cpu_table: str, settings: Settings,
                 args: argparse.Namespace) -> str:
    command = shlex.join([".venv/bin/python", "bench/load.py", *sys.argv[1:]])
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores.

```
{command}
```

{args.requests} counted searches per target and round (POST /api/v1/search/, final_topk {FINAL_TOPK},
queries cycled from `{args.dataset}/queries.jsonl`) from {args.concurrency} closed-loop clients, after
{args.warmup} uncounted warm-up requests; client and servers on the same machine; {args.rounds} rounds,
each measuring uvicorn first, then every Serve target. Serve: one replica each of ingress, pipeline
arm and embedder; the embedder batches up to {settings.embedding.max_batch_size} queries per forward
pass (serve-unbatched: 1); serve-haproxy = on a Ray started with `RAY_SERVE_ENABLE_HA_PROXY=1`;
serve-throughput-optimized = on a Ray started with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`. Each Serve target
is measured once the learners are idle. Ray workers at niceness {os.environ["RAY_worker_niceness"]}
(Ray's default is 15). uvicorn: `python -m serve_app.standalone`, one process, niceness 0.

Searches per second in each round, and against that round's uvicorn:

{rounds_table}

All rounds pooled. Ratios are target / uvicorn. Server CPU: user + system time of the serving
processes (all of Ray's, or the uvicorn process) and PostgreSQL, per request; largely
independent of other load. Other work: CPU time used meanwhile by every other process on the
machine (the load generator excluded), as a share of all cores; well above 0 means the cores
were shared and the timings are pessimistic.

{table}

Server CPU per request (ms) by process; `ray::NAME` is a Ray worker (a Serve replica is
`ServeReplica:APP:DEPLOYMENT`), the others are Ray's own processes and PostgreSQL:

{cpu_table}

Learning backlogs drained before measuring (the learners' own pace: {settings.learning.learners} learners,
batches of {settings.learning.batch_size}, replayed from the experiences the database holds):
{"; ".join(args.backlogs) or "none"}.

Latency distributions: `{args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot}`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.backlogs = []  # learning backlogs drained before a Serve target was measured
    loopback_only_environment()
    # Ray starts its workers at niceness 15; the uvicorn process runs at 0. Equal priority, so
    # neither side loses the cores to the load generator or to other work on the machine.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # One replica per deployment, as the table says (bench/autoscale.py measures more of them).
    for pinned in ("DTRAG_PIPELINE_REPLICAS", "DTRAG_TREATMENT_REPLICAS", "DTRAG_EMBEDDER_REPLICAS"):
        os.environ.setdefault(pinned, "1")
    queries = list(load_queries(args.dataset).values())
    base = load_settings()
    base = dataclasses.replace(base, http=dataclasses.replace(base.http, host="127.0.0.1", port=args.serve_port))
    url = resolve_database_url(None, args.state_dir)  # the embedded server; stops when we exit
    settings = base.with_database_url(url)
    key = create_bench_key(url)
    rounds: list[list[LoadResult]] = []
    try:
        for number in range(1, args.rounds + 1):
            rounds.append(measure_round(settings, key, queries, args))
            print(f"round {number} of {args.rounds}:", format_rounds(rounds[-1:], first=number), sep="\n")
    finally:
        asyncio.run(revoke(url, key))

    results = [LoadResult.pooled(each) for each in zip(*rounds)]
    table = format_table(results, baseline=results[-1])
    cpu_table = format_cpu_by_role(results)
    rounds_table = format_rounds(rounds)
    print(rounds_table, table, cpu_table, sep="\n\n")
    for r in results:
        for error in sorted(set(r.errors))[:5]:
            print(f"{r.target}: {r.errors.count(error)} x {error}", file=sys.stderr)
    plot_latencies(results, args.plot)
    replace_section(args.results, SECTION, section_body(rounds_table, table, cpu_table, settings, args))
    print(f"wrote {args.plot} and the load section of {args.results}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
