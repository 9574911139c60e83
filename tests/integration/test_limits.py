"""Limits and health over real HTTP against the real Serve app: per-key rate limits, the request
deadline, bounded pool waits, /health per arm and actor, and replicas that outlive a database outage.

The app runs with tight limits (a pool of one connection per process, a 3 s deadline, three
requests per key and then one per 20 s), so each test takes fresh keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from cluster.platform.api_keys import create_key
from cluster.platform.embedded import server_stopped

pytestmark = pytest.mark.integration

DEADLINE_S = 3.0
POOL_WAIT_S = 1.0
HEALTH_PERIOD_S = 0.5
_names = itertools.count()


@pytest.fixture(scope="module")
def limited(live_settings):
    s = live_settings
    return dataclasses.replace(
        s,
        # A query outlives the tests' waits unless it is cancelled (30 s command time-out).
        database=dataclasses.replace(s.database, pool_size=1, max_overflow=0, pool_timeout_s=POOL_WAIT_S,
                                     command_timeout_s=30),
        http=dataclasses.replace(s.http, request_timeout_s=DEADLINE_S, rate_limit_per_s=0.05, rate_limit_burst=3),
        serve=dataclasses.replace(s.serve, health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=2.0),
    )


@pytest.fixture(scope="module")
async def service(limited, deployed) -> AsyncIterator[str]:
    async with deployed(limited, "limits-tests") as client:
        yield str(client.base_url).rstrip("/")


@pytest.fixture
def new_client(service, pool):
    """`async with new_client(scopes) as client`: a client with a key of its own (its own bucket)."""

    @contextlib.asynccontextmanager
    async def make(scopes: tuple[str, ...] = ("search",)) -> AsyncIterator[httpx.AsyncClient]:
        async with pool.acquire() as connection:
            key = await create_key(connection, f"limits-{next(_names)}", list(scopes))
        async with httpx.AsyncClient(base_url=service, headers={"X-API-Key": key}, timeout=60) as client:
            yield client

    return make


@contextlib.asynccontextmanager
async def postings_locked(pool) -> AsyncIterator[None]:
    """Every search blocks on its first query (BM25 reads `postings`) until the block ends."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("LOCK TABLE postings IN ACCESS EXCLUSIVE MODE")
        yield


async def waiting_on_locks(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")


def assert_json_error(response: httpx.Response, status: int, error: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_a_key_over_its_rate_gets_429_with_retry_after(new_client):
    async with new_client() as client, new_client() as other:
        for _ in range(3):  # the burst
            assert (await client.post("/api/v1/search/", json={"q": "glaciers"})).status_code == 200
        refused = await client.post("/api/v1/search/", json={"q": "glaciers"})
        assert "rate limit" in assert_json_error(refused, 429, "too_many_requests")["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one token per 20 s
        assert (await other.post("/api/v1/search/", json={"q": "glaciers"})).status_code == 200


async def test_a_search_past_the_deadline_is_504_and_its_query_is_cancelled(new_client, pool, eventually):
    async with new_client() as client, postings_locked(pool):
        started = time.monotonic()
        response = await client.post("/api/v1/search/", json={"q": "glaciers"})
        elapsed = time.monotonic() - started
        body = assert_json_error(response, 504, "gateway_timeout")
        assert "deadline" in body["message"] and "Traceback" not in response.text
        assert DEADLINE_S <= elapsed < DEADLINE_S + 5, elapsed
        # The arm's query stopped waiting on the lock while the lock is still held: it was cancelled.
        await eventually(lambda: _none_waiting(pool), timeout_s=10)  # the query's own time-out is 30 s
    async with new_client() as client:
        assert (await client.post("/api/v1/search/", json={"q": "glaciers"})).status_code == 200


async def _none_waiting(pool) -> bool:
    return await waiting_on_locks(pool) == 0


async def test_a_search_waiting_for_a_pooled_connection_is_503_with_retry_after(new_client, pool, eventually):
    """The arm's only connection is stuck on the lock; the next search gives up waiting for it."""
    async with new_client() as first, new_client() as second, postings_locked(pool):
        holding = asyncio.create_task(first.post("/api/v1/search/", json={"q": "glaciers"}))
        await eventually(lambda: waiting_on_locks(pool))  # the first search holds the connection now
        started = time.monotonic()
        waiting = await second.post("/api/v1/search/", json={"q": "rivers"})
        elapsed = time.monotonic() - started
        body = assert_json_error(waiting, 503, "service_unavailable")
        assert "no database connection came free" in body["message"]
        assert waiting.headers["retry-after"] == "1"
        assert POOL_WAIT_S <= elapsed < DEADLINE_S, elapsed
        assert_json_error(await holding, 504, "gateway_timeout")


async def _health(service: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=service, timeout=60) as anonymous:
        return await anonymous.get("/health")


async def test_health_is_200_while_one_arm_serves_and_503_when_none_can(service, new_client, eventually):
    async def status(expected_code: int, expected_down: list[str]) -> dict | None:
        response = await _health(service)
        body = response.json()
        return body if response.status_code == expected_code and body["down"] == expected_down else None

    async def set_fault(arm: str, failing: bool) -> None:
        async with new_client(("admin",)) as admin:  # a key per call: the tight rate limit
            response = await admin.put("/api/v1/admin/faults", json={"arm": arm, "failing": failing})
            assert response.status_code == 200, response.text

    healthy = await eventually(lambda: status(200, []))
    assert healthy["status"] == "ok"
    assert healthy["actors"] == {"rollout_control": True, "learning_state": True, "learner_driver": True}
    try:
        await set_fault("treatment", True)
        degraded = await eventually(lambda: status(200, ["arms.treatment"]))
        assert degraded["status"] == "degraded"
        assert degraded["cluster"] == {"ready": False, "arms": {"control": True, "treatment": False}}
        await set_fault("control", True)
        down = await eventually(lambda: status(503, ["arms.control", "arms.treatment"]))
        assert down["status"] == "unavailable" and set(down) - {"request_id"} == set(healthy)  # the same shape
    finally:
        for arm in ("control", "treatment"):
            await set_fault(arm, False)
    await eventually(lambda: status(200, []))


def _replica_actors() -> set[str]:
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::dtrag#")}


async def test_a_database_outage_answers_503_and_restarts_no_replica(service, new_client, live_settings,
                                                                     eventually):
    """check_health asks nothing shared: with PostgreSQL down for many health periods, Serve
    keeps every replica, and the service comes back by itself."""
    replicas = _replica_actors()
    assert len(replicas) == 4  # ingress, two arms, embedder
    async with new_client() as client:
        assert (await client.post("/api/v1/search/", json={"q": "glaciers"})).status_code == 200  # key cached
        with server_stopped(live_settings.state_dir):
            outage = time.monotonic()
            while time.monotonic() - outage < 8 * HEALTH_PERIOD_S + 2.0:  # Serve checks every replica meanwhile
                health = await _health(service)
                assert health.status_code == 503 and health.json()["database"]["ready"] is False
                assert "asyncpg" not in health.text and "Error" not in health.text
            search = await client.post("/api/v1/search/", json={"q": "glaciers"})
            assert_json_error(search, 503, "service_unavailable")
            assert search.headers["retry-after"] in ("1", "2")

        async def serving() -> bool:
            return (await _health(service)).status_code == 200

        await eventually(serving)
    assert _replica_actors() == replicas


async def test_an_actor_that_is_gone_is_named_while_searches_go_on(service, new_client, eventually):
    import ray

    from cluster.actors import NAMESPACE
    from cluster.actors.learners import DRIVER_NAME

    ray.kill(ray.get_actor(DRIVER_NAME, namespace=NAMESPACE), no_restart=True)

    async def named() -> dict | None:
        response = await _health(service)
        body = response.json()
        return body if response.status_code == 200 and body["down"] == ["actors.learner_driver"] else None

    report = await eventually(named)
    assert report["status"] == "degraded" and report["actors"]["learner_driver"] is False
    async with new_client() as client:
        assert (await client.post("/api/v1/search/", json={"q": "glaciers"})).status_code == 200
