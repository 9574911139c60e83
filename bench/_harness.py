"""Helpers the benchmark scripts share: the database and its bench key, a local Ray with Serve,
admin calls, and writing a section of `bench/RESULTS.md`.

Not a benchmark itself. The scripts run as `.venv/bin/python bench/NAME.py`, so `bench/` is on
`sys.path` and they `import _harness`. Nothing here imports Ray at import time: a script must be
able to call `loopback_only_environment()` before Ray is first imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from cluster.data.corpus import sample_corpus_dir
from cluster.data.ingest import document_count, ingest
from cluster.platform.api_keys import create_key, revoke_key
from cluster.platform.database import create_pool
from cluster.platform.migrate import migrate
from cluster.platform.runtime import deploy, start_ray, start_serve
from cluster.platform.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def local_settings(settings: Settings, http_port: int, metrics_port: int) -> Settings:
    """`settings` for a Ray of our own: Serve on 127.0.0.1:`http_port`, Ray's metrics on `metrics_port`,
    no dashboard (a benchmark submits no jobs, and a `dtrag up` may hold its port)."""
    return dataclasses.replace(
        settings,
        http=dataclasses.replace(settings.http, host="127.0.0.1", port=http_port),
        ray=dataclasses.replace(settings.ray, address=None, metrics_port=metrics_port, dashboard_port=0),
    )


# --- the database -----------------------------------------------------------------------------


async def migrated(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
    finally:
        await connection.close()


async def prepare_database(settings: Settings, key_name: str) -> str:
    """Migrate, load the sample corpus into an empty database, and return a search + admin key."""
    assert settings.database.url
    await migrated(settings.database.url)  # before the pool: its connections need pgvector's type
    pool = await create_pool(settings.database.url, settings.database)
    try:
        if await document_count(pool) == 0:
            from serve_app.embedding import TextEmbedder

            embedder = TextEmbedder()
            await ingest(pool, sample_corpus_dir(),
                         lambda texts: embedder.encode(texts, settings.embedding.batch_size))
        async with pool.acquire() as connection:
            return await create_key(connection, key_name, ["search", "admin", "name_users"])
    finally:
        await pool.close()


async def revoke(url: str, key: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await revoke_key(connection, key.split("_")[1])
    finally:
        await connection.close()


# --- Ray, Serve and the app -------------------------------------------------------------------


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url/health` until it answers 200; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


@contextlib.contextmanager
def ray_serve(settings: Settings) -> Iterator[str]:
    """A local Ray with Serve's proxy on the configured host and port; yields its URL."""
    from ray import serve

    start_ray(settings.ray)
    try:
        start_serve(settings.http)
        yield f"http://{settings.http.host}:{settings.http.port}"
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


def deploy_app(settings: Settings, url: str, timeout_s: float) -> None:
    """(Re)deploy the DT-RAG app with `settings` and wait until it answers.

    `build_app` starts the cluster's actors, or finds the running ones, in the connected Ray.
    """
    from serve_app.app import APP_NAME, build_app

    deploy(build_app(settings), APP_NAME)
    wait_healthy(url, timeout_s)


def admin(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """An admin API call that must succeed."""
    response = client.request(method, path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


# --- CPU accounting ---------------------------------------------------------------------------


def process_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of one process so far; psutil.Error if it is gone."""
    times = process.cpu_times()
    return times.user + times.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy so far.

    Guest time is already inside user and nice, and steal is time the machine did not get.
    """
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))


# --- reporting --------------------------------------------------------------------------------


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `body` under `heading` in a Markdown file, leaving every other section as it was."""
    lines = path.read_text().splitlines() if path.exists() else []
    new = [heading, "", *body.strip().splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    else:
        lines += (["", *new] if lines else new)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it, else its file name."""
    return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else path.name
