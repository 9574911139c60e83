"""With the database gone, the API answers 503 with a reason, never 500, and /health says so."""

import logging

import httpx
import pytest

from cluster.core.vocabulary import FeatureFlags
from cluster.platform.api_keys import ApiKeyVerifier, create_key
from cluster.platform.database import create_pool
from serve_app.api import create_api
from serve_app.answers.from_settings import composer_from_settings
from serve_app.pipeline import SearchPipeline
from serve_app.retrieval import DocumentIndex
from serve_app.standalone import LocalBackend

pytestmark = pytest.mark.integration


@pytest.fixture
async def api_over_lost_database(pool, live_settings, embedder):
    """A real app whose own pool is closed after a key was issued and checked once."""
    own_pool = await create_pool(live_settings.database.url, live_settings.database)
    async with pool.acquire() as connection:
        key = await create_key(connection, "outage", ["search"])
    index = DocumentIndex(own_pool, bm25_k1=0.9, bm25_b=0.4, ef_search=40)

    async def embed_query(query):
        vectors, cpu_ms = embedder.encode_with_cpu([query])
        return vectors[0], cpu_ms

    verifier = ApiKeyVerifier(own_pool, cache_seconds=300)
    assert await verifier.verify(key)
    app = create_api(LocalBackend(SearchPipeline(index, embed_query, live_settings.retrieval,
                                                 composer_from_settings(live_settings), "x"), "test",
                                  FeatureFlags()),
                     verifier, max_body_bytes=live_settings.http.max_body_bytes)
    await own_pool.close()
    return app, key


async def test_search_and_health_report_the_outage(api_over_lost_database):
    app, key = api_over_lost_database
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/api/v1/search/", json={"q": "glaciers"}, headers={"X-API-Key": key})
        assert response.status_code == 503
        assert response.json()["error"] == "service_unavailable"
        assert "database unavailable" in response.json()["message"]
        unchecked = await client.post("/api/v1/search/", json={"q": "x"},
                                      headers={"X-API-Key": "dtrag_abc_def"})
        assert unchecked.status_code == 503
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["database"]["ready"] is False and health.json()["status"] == "unavailable"
        for leaking in (response, unchecked, health):  # no driver text: its exception names, its words
            assert not any(word in leaking.text for word in ("Error", "asyncpg", "pool is closed", "Traceback"))
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert "PostgreSQL" in health.json()["database"]["error"]


async def test_the_driver_detail_goes_to_the_log_with_the_request_id(api_over_lost_database, caplog):
    app, key = api_over_lost_database
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.post("/api/v1/search/", json={"q": "glaciers"},
                                     headers={"X-API-Key": key, "X-Request-Id": "outage-1"})
    assert response.status_code == 503
    (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "outage-1"]
    assert line.status == 503 and "InterfaceError" in line.detail
