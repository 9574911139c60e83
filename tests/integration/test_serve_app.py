"""The Serve application end to end over real HTTP: search, validation, keys, health, eval."""

from __future__ import annotations

import hashlib
import ipaddress
import time

import httpx
import pytest

from cluster.platform.api_keys import create_key
from cluster.cli.main import main as dtrag
from cluster.data.corpus import sample_corpus_dir
from serve_app.search_ids import new_search_id

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def service(live_settings, deployed):
    """The app deployed once for this module (default settings); yields its base URL."""
    async with deployed(live_settings, "serve-tests") as client:
        yield str(client.base_url).rstrip("/")


@pytest.fixture(scope="module")
async def keys(pool) -> dict[str, str]:
    async with pool.acquire() as connection:
        return {
            "search": await create_key(connection, "tests", ["search"]),
            "admin_only": await create_key(connection, "ops", ["admin"]),
        }


@pytest.fixture
async def client(service, keys):
    async with httpx.AsyncClient(base_url=service, headers={"X-API-Key": keys["search"]},
                                 timeout=30) as client:
        yield client


async def test_search_returns_the_requested_number_of_hits(client):
    response = await client.post("/api/v1/search/", json={"q": "machine learning", "final_topk": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["hits"]) == 5
    assert body["arm"] == "control" and body["strategy"] == "hybrid@0.5"
    assert body["answer"]["mode"] == "extractive" and body["answer"]["citations"]
    assert body["latency_ms"] > 0 and len(body["search_id"]) == 32
    for topk in (1, 50):
        response = await client.post("/api/v1/search/", json={"q": "ocean currents", "final_topk": topk})
        assert len(response.json()["hits"]) == topk


async def test_default_topk_and_explicit_strategy(client):
    body = (await client.post("/api/v1/search/", json={"q": "black holes", "strategy": "lexical"})).json()
    assert len(body["hits"]) == 5 and body["strategy"] == "lexical"


async def test_rank_endpoint_goes_deeper_than_search(client):
    response = await client.post("/api/v1/rank", json={"q": "vaccines", "strategy": "dense", "depth": 100})
    assert response.status_code == 200
    assert len(response.json()["ranking"]) == 100


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"q": ""}, "q"),
        ({"q": "   "}, "q"),
        ({"q": "x" * 1001}, "q"),
        ({"q": "x", "final_topk": 0}, "final_topk"),
        ({"q": "x", "final_topk": 51}, "final_topk"),
        ({"q": "x", "final_topk": "5"}, "final_topk"),
        ({"q": "x", "final_topk": 5.5}, "final_topk"),
        ({"q": 42}, "q"),
        ({}, "q"),
        ({"q": "x", "strategy": "magic"}, "strategy"),
        ({"q": "x", "finaltopk": 5}, "finaltopk"),
        ([1, 2], "body"),
    ],
)
async def test_bad_search_bodies_are_422_naming_the_field(client, body, field):
    response = await client.post("/api/v1/search/", json=body)
    assert response.status_code == 422, response.text
    payload = response.json()
    assert payload["error"] == "invalid_request"
    assert field in [e["field"] for e in payload["errors"]]
    assert field in payload["message"]


async def test_non_json_and_oversized_bodies(client):
    response = await client.post("/api/v1/search/", content=b"q=machine",
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "body"
    response = await client.post("/api/v1/search/", content=b"{" + b" " * 70_000 + b"}",
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"


async def test_keys_are_checked_and_scoped(service, keys, pool):
    async with httpx.AsyncClient(base_url=service, timeout=30) as anonymous:
        body = {"q": "rivers"}
        missing = await anonymous.post("/api/v1/search/", json=body)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["message"]
        for wrong in ("nonsense", keys["search"] + "x", "dtrag_000000000000_secret"):
            response = await anonymous.post("/api/v1/search/", json=body, headers={"X-API-Key": wrong})
            assert response.status_code == 401, wrong
        forbidden = await anonymous.post("/api/v1/search/", json=body,
                                         headers={"X-API-Key": keys["admin_only"]})
        assert forbidden.status_code == 403 and "search" in forbidden.json()["message"]


async def test_stored_keys_are_hashed(pool, keys):
    _, key_id, secret = keys["search"].split("_", 2)  # dtrag_<id>_<secret>; the secret may hold "_"
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    assert bytes(row["secret_hash"]) == hashlib.sha256(secret.encode()).digest()
    stored = [bytes(v).decode("latin-1") if isinstance(v, bytes) else str(v) for v in row.values()]
    assert not any(secret in value or secret.encode().hex() in value for value in stored)


async def test_health_and_docs(service):
    async with httpx.AsyncClient(base_url=service, timeout=30) as anonymous:
        health = await anonymous.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["down"] == []
        assert health.json()["database"]["ready"] and health.json()["cluster"]["arms"] == {"control": True, "treatment": True}
        assert health.json()["actors"] == {"rollout_control": True, "learning_state": True, "learner_driver": True}
        assert (await anonymous.get("/docs")).status_code == 200
        paths = (await anonymous.get("/openapi.json")).json()["paths"]
        assert {"/api/v1/search/", "/api/v1/rank", "/health"} <= set(paths)


async def test_feedback_for_an_unknown_id_waits_only_while_the_search_may_be_in_flight(client):
    """An id minted long ago (or before ids carried their time) is 404 at once; one minted now
    may still be on its way to the database, so it is looked for a little before the 404."""
    timings = {}
    for name, search_id in (("old", "0" * 32), ("fresh", new_search_id())):
        started = time.monotonic()
        response = await client.post("/api/v1/feedback", json={"search_id": search_id, "clicks": ["d1"]})
        timings[name] = time.monotonic() - started
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found" and search_id in response.json()["message"]
    assert timings["fresh"] >= 2.0  # the arrival wait
    assert timings["old"] < 1.0, timings


def test_dtrag_eval_prints_metrics_per_strategy(service, keys, capsys):
    code = dtrag(["eval", str(sample_corpus_dir()), "--url", service, "--api-key", keys["search"],
                  "--strategy", "lexical", "--strategy", "hybrid_rrf"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| lexical | 40 |" in table and "| hybrid_rrf | 40 |" in table
    assert "nDCG@10" in table and "R@100" in table


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


async def test_every_socket_of_the_cluster_is_on_loopback(service):
    """No listener on a wildcard or machine address, no connection off loopback (Ray and Postgres)."""
    import psutil

    cluster_processes = [p for p in psutil.process_iter(["name", "cmdline"])
                         if any(word in " ".join(p.info["cmdline"] or []) for word in ("ray", "postgres"))
                         or p.info["name"] in ("gcs_server", "raylet", "postgres")]
    assert cluster_processes
    exposed = []
    for process in cluster_processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        exposed += [(process.info["name"], c.status, c.laddr, c.raddr) for c in connections
                    if not _loopback(c.laddr.ip) or (c.raddr and not _loopback(c.raddr.ip))]
    assert not exposed, exposed
