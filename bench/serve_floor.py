"""Serve's floor: the CPU a request costs in Ray Serve when the handlers do no work.

bench/load.py compares the DT-RAG app under Serve with the same pipeline in one uvicorn process.
This benchmark asks what part of the difference no Serve design can remove: the same client
(bench/load.py's closed loop, POST /api/v1/search/) against an echo app that answers at once with
ten hits the size of a real search's:

1. `uvicorn echo`: the echo app in one uvicorn process (the baseline);
2. `serve echo, 1 deployment`: the same FastAPI app as a Serve ingress (proxy -> replica);
3. `serve echo, 1 deployment, no FastAPI`: the same, Serve handing the request to `__call__`;
4. `serve echo, 3 deployments`: ingress -> middle -> back over `DeploymentHandle` calls,
   DT-RAG's shape (ingress -> arm -> embedder), the back one building the hits;
5. the no-FastAPI deployment on a Ray started with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`.

Serve's floor is a Serve target's server CPU per request less uvicorn's. Given `--state-dir`
(an ingested DTRAG_STATE_DIR) it also measures the real pipeline in one uvicorn process in the
same run, P ms of server CPU per search with PostgreSQL, and reports P / (P + floor): the CPU
a search would cost one uvicorn process for each CPU it costs a Serve app of that many
deployments that adds the echo's floor and nothing else. That is a ratio of CPU, not of
throughput: one uvicorn process does not use every core (bench/load.py reports both), so Serve's
throughput against it can be higher, and an app that batches across requests (the embedder)
pays less per request for its hop than the echo does.

    .venv/bin/python bench/serve_floor.py --state-dir /tmp/bench-state --dataset $DATA/scifact

Writes the section "## Serve's floor: CPU per request with no work" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import uvicorn
from fastapi import FastAPI
from starlette.requests import Request

from cluster.platform.runtime import deploy, loopback_only_environment

loopback_only_environment()  # before Ray is imported: the deployments below are defined with it

from ray import serve  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402

from _harness import BENCH, process_cpu_seconds, ray_serve, replace_section, revoke, wait_healthy  # noqa: E402
from cluster.data.beir import load_queries  # noqa: E402
from cluster.data.corpus import sample_corpus_dir  # noqa: E402
from cluster.platform.database import resolve_database_url  # noqa: E402
from cluster.platform.settings import load_settings  # noqa: E402
from load import (  # noqa: E402
    HEALTH_TIMEOUT_S,
    LoadResult,
    create_bench_key,
    format_cpu_by_role,
    ray_environment,
    run_load,
    serving,
    standalone_server,
)

SECTION = "## Serve's floor: CPU per request with no work"
IDLE_WINDOW_S = 20.0
ECHO_APP = "echo"


def echo_hits(query: str) -> dict:
    """A search response's shape and size: ten hits with a title and a 240-character snippet."""
    return {"search_id": "0" * 32, "query": query, "strategy": "hybrid@0.5", "arm": "control",
            "config_version": 1, "policy_version": 0,
            "hits": [{"doc_id": f"doc-{rank}", "title": f"A title of about sixty characters, number {rank:02d}.",
                      "snippet": ("word " * 48)[:240], "score": 1.0 / rank, "rank": rank}
                     for rank in range(1, 11)]}


def plain_api() -> FastAPI:
    """The echo as a plain FastAPI app, for uvicorn."""
    api = FastAPI()

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @api.post("/api/v1/search/")
    async def search(body: dict) -> dict:
        return echo_hits(body["q"])

    return api


serve_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(serve_api)
class Front:
    """The same routes as a Serve ingress: answers itself, or through `back`."""

    def __init__(self, back: DeploymentHandle | None = None):
        self._back = back

    @serve_api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @serve_api.post("/api/v1/search/")
    async def search(self, body: dict) -> dict:
        return await self._back.remote(body["q"]) if self._back is not None else echo_hits(body["q"])


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PlainFront:
    """The same routes with no web framework: Serve hands `__call__` the Starlette request."""

    async def __call__(self, request: Request) -> dict:
        if request.method == "GET":
            return {"status": "ok"}
        return echo_hits((await request.json())["q"])


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Middle:
    def __init__(self, back: DeploymentHandle):
        self._back = back

    async def __call__(self, query: str) -> dict:
        return await self._back.remote(query)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Back:
    async def __call__(self, query: str) -> dict:  # async, as every deployment of the app: no thread pool
        return echo_hits(query)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="an ingested DTRAG_STATE_DIR: also measure the real pipeline under uvicorn")
    parser.add_argument("--dataset", type=Path, default=sample_corpus_dir(),
                        help="a folder with queries.jsonl (default: the sample corpus)")
    parser.add_argument("--requests", type=int, default=3000, help="counted requests per echo target")
    parser.add_argument("--pipeline-requests", type=int, default=1000, help="counted searches, real pipeline")
    parser.add_argument("--concurrency", type=int, default=10, help="closed-loop clients")
    parser.add_argument("--warmup", type=int, default=50, help="uncounted requests first")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--serve-port", type=int, default=8100)
    parser.add_argument("--uvicorn-port", type=int, default=8101)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--echo-child", type=int, default=None, help=argparse.SUPPRESS)  # the uvicorn echo
    return parser.parse_args(argv)


def uvicorn_echo(port: int) -> contextlib.AbstractContextManager[str]:
    """The echo app in a uvicorn process of its own (this script, `--echo-child`)."""
    return serving([sys.executable, __file__, "--echo-child", str(port)], port)


def idle_cpu_ms_per_s(window_s: float) -> float:
    """CPU ms per second this process's descendants (Ray, with the echo deployed) use with no requests."""
    def total() -> float:
        seconds = 0.0
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seconds += process_cpu_seconds(process)
        return seconds

    before, started = total(), time.perf_counter()
    time.sleep(window_s)  # the measurement window itself, not a wait for a condition
    return 1000 * (total() - before) / (time.perf_counter() - started)


def measure(args: argparse.Namespace, queries: list[str]) -> tuple[list[LoadResult], LoadResult | None, float]:
    """The echo targets, then (given a state folder) the real pipeline under uvicorn."""
    echo = argparse.Namespace(**{**vars(args), "state_dir": None})  # no PostgreSQL to count
    with uvicorn_echo(args.uvicorn_port) as url:
        results = [asyncio.run(run_load("uvicorn echo", url, "", queries, echo))]
    settings = load_settings()
    settings = dataclasses.replace(settings, http=dataclasses.replace(settings.http, host="127.0.0.1",
                                                                      port=args.serve_port))
    serve_targets = (
        ({}, (("serve echo, 1 deployment", Front.bind()),
              ("serve echo, 1 deployment, no FastAPI", PlainFront.bind()),
              ("serve echo, 3 deployments", Front.bind(Middle.bind(Back.bind())))),
         ),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
         (("serve echo, 1 deployment, no FastAPI, throughput-optimized", PlainFront.bind()),)),
    )
    idle = 0.0
    for variables, targets in serve_targets:
        with ray_environment(variables), ray_serve(settings) as url:
            for target, app in targets:
                deploy(app, ECHO_APP)
                wait_healthy(url, HEALTH_TIMEOUT_S)
                results.append(asyncio.run(run_load(target, url, "", queries, echo)))
            if not variables:  # Ray as bench/load.py's default targets run it
                idle = idle_cpu_ms_per_s(IDLE_WINDOW_S)
            serve.delete(ECHO_APP)
    pipeline = None
    if args.state_dir is not None:
        database = resolve_database_url(None, args.state_dir)
        key = create_bench_key(database)
        real = argparse.Namespace(**{**vars(args), "requests": args.pipeline_requests})
        try:
            with standalone_server(settings.with_database_url(database), args.uvicorn_port,
                                   BENCH / "results" / "serve_floor_uvicorn.log") as url:
                pipeline = asyncio.run(run_load("uvicorn pipeline", url, key, queries, real))
        finally:
            asyncio.run(revoke(database, key))
    return results, pipeline, idle


def format_floor(results: Sequence[LoadResult], pipeline: LoadResult | None) -> str:
    """One row per echo target: its pace, CPU per request and floor; with the pipeline, P / (P + floor)."""
    baseline = results[0].service_cpu_ms_per_request
    lines = ["| target | req/s | p50 ms | server CPU ms/req | floor: ms/req over uvicorn echo "
             "| uvicorn pipeline CPU / (it + floor) | other work, % of cores |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        floor = r.service_cpu_ms_per_request - baseline
        share = "" if pipeline is None else (
            f"{pipeline.service_cpu_ms_per_request / (pipeline.service_cpu_ms_per_request + floor):.2f}")
        lines.append(f"| {r.target} | {r.requests_per_second:.0f} | {r.percentile(50):.1f} | "
                     f"{r.service_cpu_ms_per_request:.2f} | {floor:.2f} | {share} | {r.other_cpu_percent:.0f} |")
    if pipeline is not None:
        lines.append(f"| {pipeline.target} | {pipeline.requests_per_second:.1f} | {pipeline.percentile(50):.0f} | "
                     f"{pipeline.service_cpu_ms_per_request:.1f} | | 1.00 | {pipeline.other_cpu_percent:.0f} |")
    return "\n".join(lines)


def section_body(floor_table: str, cpu_table: str, idle_ms_per_s: float, args: argparse.Namespace) -> str:
    command = shlex.join([".venv/bin/python", "bench/serve_floor.py",
                          *(a for a in sys.argv[1:] if not a.startswith("--echo-child"))])
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores.

```
{command}
```

{args.requests} counted requests per echo target (POST /api/v1/search/ answered at once with ten
hits of a search's size) from {args.concurrency} closed-loop clients after {args.warmup} uncounted,
with bench/load.py's client and CPU accounting (Ray workers at niceness
{os.environ["RAY_worker_niceness"]}). Floor: a target's server CPU per request less the uvicorn
echo's. P / (P + floor), P the server CPU per search (PostgreSQL included) of the real pipeline
in one uvicorn process, measured in the same run: the CPU per search of uvicorn over that of a
Serve app that adds exactly the floor (a ratio of CPU; see the notes).

{floor_table}

Server CPU per request (ms) by process:

{cpu_table}

Ray (default options) with the 3-deployment echo deployed and no requests: {idle_ms_per_s:.0f} ms of CPU per second
(over {IDLE_WINDOW_S:.0f} s). At the echo's pace that is a small part of each request; at 20 searches a
second it would be {idle_ms_per_s / 20:.1f} ms of each.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_child is not None:
        uvicorn.run(plain_api(), host="127.0.0.1", port=args.echo_child, log_level="warning", access_log=False)
        return 0
    os.environ.setdefault("RAY_worker_niceness", "0")  # as bench/load.py: the same priority as uvicorn
    queries = list(load_queries(args.dataset).values())
    results, pipeline, idle = measure(args, queries)
    floor_table, cpu_table = format_floor(results, pipeline), format_cpu_by_role(results)
    print(floor_table, cpu_table, f"idle Ray with the echo deployed: {idle:.0f} ms CPU per second", sep="\n\n")
    replace_section(args.results, SECTION, section_body(floor_table, cpu_table, idle, args))
    print(f"wrote the section '{SECTION}' of {args.results}")
    return 1 if any(r.errors for r in [*results, *([pipeline] if pipeline else [])]) else 0


if __name__ == "__main__":
    sys.exit(main())
