"""Shared fixtures: one embedded PostgreSQL, one embedding model and one Ray per test session."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from pathlib import Path

import asyncpg
import pytest

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before any test module imports ray

from cluster.data.corpus import sample_corpus_dir  # noqa: E402
from cluster.platform.database import create_pool, resolve_database_url  # noqa: E402
from cluster.data.ingest import ingest  # noqa: E402
from cluster.platform.migrate import migrate  # noqa: E402
from cluster.platform.settings import Settings, load_settings  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_database(url: str, name: str) -> str:
    """The same server's URL with another database name."""
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


@pytest.fixture
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Defaults with a private state folder; the host's own DATABASE_URL etc. are ignored."""
    state_dir = tmp_path_factory.mktemp("state")
    return load_settings(environ={
        "DTRAG_STATE_DIR": str(state_dir),
        "DTRAG_HTTP_PORT": str(free_port()),
        "DTRAG_METRICS_PORT": str(free_port()),
        "DTRAG_DASHBOARD_PORT": "0",  # no job server: the `dtrag up` tests cover it
        "ENVIRONMENT": "test",  # allows the rollout tests' fault injection
        # One replica each, pinned: a test's burst must not start replicas the next test pays for.
        # `dtrag up` in test_cli runs the autoscaled deployments of configs/serve.yaml.
        "DTRAG_PIPELINE_REPLICAS": "1",
        "DTRAG_TREATMENT_REPLICAS": "1",
        "DTRAG_EMBEDDER_REPLICAS": "1",
    })


@pytest.fixture(scope="session")
def live_settings(settings: Settings) -> Settings:
    return settings.with_database_url(resolve_database_url(None, settings.state_dir))


@pytest.fixture(scope="session")
def embedder():
    from serve_app.embedding import TextEmbedder

    return TextEmbedder()


@pytest.fixture(scope="session")
async def pool(live_settings: Settings, embedder) -> AsyncIterator[asyncpg.Pool]:
    """The session database, migrated and holding the sample corpus."""
    assert live_settings.database.url
    connection = await asyncpg.connect(live_settings.database.url)
    await migrate(connection)
    await connection.close()
    pool = await create_pool(live_settings.database.url, live_settings.database)
    await ingest(pool, sample_corpus_dir(), embedder.encode, show_progress=False)
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def temporary_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """The URL of a new, empty, unmigrated database on the server at `server_url`, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def fresh_database_url(live_settings: Settings) -> AsyncIterator[str]:
    """An empty, unmigrated database on the session server, dropped afterwards."""
    assert live_settings.database.url
    async with temporary_database(live_settings.database.url, "test") as url:
        yield url


@pytest.fixture
async def empty_pool(fresh_database_url: str, live_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool to a fresh database, migrated and empty."""
    connection = await asyncpg.connect(fresh_database_url)
    await migrate(connection)
    await connection.close()
    pool = await create_pool(fresh_database_url, live_settings.database)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def ray_session(settings: Settings) -> Iterator[None]:
    """One local, loopback-only Ray for every Serve test."""
    import ray

    from cluster.platform.runtime import start_ray

    start_ray(settings.ray, state_dir=settings.state_dir)
    yield
    ray.shutdown()


@pytest.fixture
def scifact() -> Path:
    """The real SciFact collection, when this machine has it."""
    path = SHARED_DATA / "scifact"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the real evaluation collections are not on this machine")
    return path



Probe = Callable[[], Awaitable[Any]]


@pytest.fixture(scope="module")
def model_server():
    """A local server speaking the Gemini and OpenAI protocols, one per test module."""
    from support.model_servers import ModelServer

    with ModelServer() as server:
        yield server


@pytest.fixture
def server(model_server):
    """The module's model server, reset to its default behaviour for each test."""
    model_server.reset()
    return model_server


@pytest.fixture
def eventually() -> Callable[..., Awaitable[Any]]:
    """`await eventually(probe)`: poll the async `probe` until it returns something truthy.

    Tests wait for the condition they assert, never for a fixed time, so a busy machine only
    makes them slower. Fails with the last value after `timeout_s`.
    """

    async def wait(probe: Probe, timeout_s: float = 60.0, interval_s: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (result := await probe()):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout_s} s; last value {result!r}")
            await asyncio.sleep(interval_s)
        return result

    return wait


@pytest.fixture(scope="session")
def reset_control_actors(pool):
    """Forget learning and rollout state between Serve test modules (actors and stored state)."""
    from cluster.actors.start import stop_actors

    async def reset() -> None:
        stop_actors()
        await pool.execute("DELETE FROM rollout_state")

    return reset


@pytest.fixture(scope="session")
def deployed(ray_session, pool, reset_control_actors):
    """Deploy the app with some settings; yields a client holding a search+admin+name_users key.

    Learning and rollout state are reset before and after, so modules do not see each other's.
    """
    import httpx

    from cluster.platform.api_keys import create_key
    from cluster.platform.runtime import deploy, start_serve
    from serve_app.app import APP_NAME, build_app

    @contextlib.asynccontextmanager
    async def deploy_with(settings: Settings, key_name: str) -> AsyncIterator[httpx.AsyncClient]:
        from ray import serve

        await reset_control_actors()
        start_serve(settings.http)
        deploy(build_app(settings), APP_NAME)
        async with pool.acquire() as connection:
            key = await create_key(connection, key_name, ["search", "admin", "name_users"])
        try:
            async with httpx.AsyncClient(base_url=f"http://{settings.http.host}:{settings.http.port}",
                                         headers={"X-API-Key": key}, timeout=30) as client:
                yield client
        finally:
            serve.shutdown()
            await reset_control_actors()

    return deploy_with
