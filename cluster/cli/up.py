"""`dtrag up`: start (or join) Ray and the database, load the sample corpus if empty, deploy; Ctrl-C stops."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from cluster.cli.db import apply_migrations, ingest_collection, print_ingest_report, with_live_database
from cluster.cli.demo_key import ensure_demo_key
from cluster.data.corpus import sample_corpus_dir
from cluster.data.ingest import document_count
from cluster.platform.database import create_pool
from cluster.platform.settings import Settings


async def _prepare(settings: Settings, load_sample: bool) -> str:
    """Migrate, load the sample corpus into an empty database, and return the demo key."""
    assert settings.database.url
    await apply_migrations(settings.database.url)
    pool = await create_pool(settings.database.url, settings.database)
    try:
        empty = await document_count(pool) == 0
    finally:
        await pool.close()
    if empty and load_sample:
        print(f"database is empty: loading the sample corpus ({sample_corpus_dir()})")
        print_ingest_report(await ingest_collection(settings, sample_corpus_dir()))
    return await ensure_demo_key(settings)


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stop:
        time.sleep(0.2)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    import ray
    from ray import serve

    from cluster.platform.runtime import deploy, start_ray, start_serve
    from serve_app.app import APP_NAME, build_app

    address = args.address or settings.ray.address
    live = with_live_database(settings)
    key = asyncio.run(_prepare(live, load_sample=not args.no_sample))
    print("starting Ray and the Serve application ...", flush=True)
    start_ray(live.ray, address)
    try:
        start_serve(live.http)
        deploy(build_app(live), APP_NAME)
        url = f"http://{live.http.host}:{live.http.port}"
        print(
            f"\nDT-RAG is serving at {url}  (API docs: {url}/docs)\n"
            f"demo API key (search, admin): {key}\n\n"
            f"  curl -s -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"q\":\"machine learning\",\"final_topk\":5}}' {url}/api/v1/search/\n\n"
            "Ctrl-C stops the service.",
            flush=True,
        )
        _wait_for_stop()
        print("shutting down ...", flush=True)
    finally:
        if address:
            serve.delete(APP_NAME)  # leave a shared cluster as we found it
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def add_parsers(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="start Ray, the database and the Serve app; Ctrl-C stops")
    up.add_argument("--address", help="an existing Ray cluster (e.g. ray://host:10001 or auto)")
    up.add_argument("--no-sample", action="store_true", help="do not load the sample corpus")
    up.set_defaults(handler=cmd_up)
