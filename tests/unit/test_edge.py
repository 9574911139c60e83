"""The HTTP edge, driven as ASGI: body limit, key gate, request ids, JSON errors, control characters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from ray.exceptions import RayTaskError

from cluster.core.vocabulary import Arm
from cluster.platform.api_keys import Principal
from cluster.core.rate_limit import RateLimiter
from cluster.platform.database import DatabaseUnavailable, PoolExhausted
from cluster.platform.errors import DeadlineExceeded, ServiceUnavailable
from serve_app.api import Caller, Health, create_api
from cluster.platform.edge import BodyLimit, RequestContext, error_response, proxy_middlewares
from serve_app.schemas import AnswerBody, SearchRequest, SearchResponse

LIMIT = 64 * 1024
KEY = "dtrag_0123456789ab_secret"
ADMIN = Principal("0123456789ab", "tests", frozenset({"search", "admin"}))


class Verifier:
    """Knows one key; `down` makes it fail the way a lost database does."""

    def __init__(self) -> None:
        self.checked: list[str] = []
        self.down = False

    async def verify(self, token: str) -> Principal | None:
        self.checked.append(token)
        if self.down:
            try:
                raise ConnectionRefusedError("[Errno 111] Connect call failed ('10.1.2.3', 5432)")
            except OSError as error:
                raise DatabaseUnavailable("API key check: database unavailable; retry shortly") from error
        return ADMIN if token == KEY else None


class Backend:
    """Answers searches, or fails with `failure` when set; records what reached it."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.searches: list[tuple[SearchRequest, Caller]] = []

    async def search(self, request: SearchRequest, principal: Principal, caller: Caller) -> SearchResponse:
        if self.failure is not None:
            raise self.failure
        self.searches.append((request, caller))
        answer = AnswerBody(text="", citations=[], mode="extractive", provider=None, model=None, usage=None,
                            latency_ms=0.0, fallback=None)
        return SearchResponse(search_id="0" * 32, query=request.q, hits=[], strategy="lexical", arm="control",
                              config_version=0, policy_version=0, answer=answer, latency_ms=1.0)

    async def health(self) -> Health:
        return Health("test", True, None, {"control": True})


class Operations:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def set_flags(self, arm: Arm, flags: dict[str, bool]) -> dict[str, Any]:
        self.calls.append(("flags", flags))
        return {}

    async def rollback(self, reason: str) -> dict[str, Any]:
        self.calls.append(("rollback", reason))
        return {}


@pytest.fixture
def parts() -> tuple[Backend, Verifier, Operations]:
    return Backend(), Verifier(), Operations()


@pytest.fixture
async def client(parts) -> AsyncIterator[httpx.AsyncClient]:
    backend, verifier, operations = parts
    app = create_api(backend, verifier, max_body_bytes=LIMIT, operations=operations)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


class Chunks:
    """A chunked body of `total` bytes that counts how much the server pulled."""

    def __init__(self, total: int, chunk: int = 16 * 1024):
        self.total, self.chunk, self.pulled = total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            self.pulled += self.chunk
            yield b" " * self.chunk


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# -- body limit and key gate ---------------------------------------------------------------

async def test_chunked_body_without_a_key_is_refused_before_any_byte_is_read(client, parts):
    body = Chunks(30 * 1024 * 1024)
    response = await client.post("/api/v1/search/", content=body.__aiter__())
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "ApiKey"
    assert body.pulled == 0


async def test_chunked_body_with_an_invalid_key_is_refused_before_any_byte_is_read(client, parts):
    body = Chunks(30 * 1024 * 1024)
    response = await client.post("/api/v1/search/", content=body.__aiter__(), headers={"X-API-Key": "dtrag_ab_x"})
    assert_error(response, 401, "unauthorized")
    assert body.pulled == 0 and parts[1].checked == ["dtrag_ab_x"]


async def test_chunked_body_over_the_limit_with_a_key_is_413_after_at_most_the_limit(client, parts):
    body = Chunks(30 * 1024 * 1024)
    response = await client.post("/api/v1/search/", content=body.__aiter__(), headers={"X-API-Key": KEY})
    assert str(LIMIT) in assert_error(response, 413, "payload_too_large")["message"]
    assert body.pulled <= LIMIT + body.chunk
    assert parts[0].searches == []


async def test_declared_length_over_the_limit_is_413_unread(client):
    response = await client.post("/api/v1/search/", content=b"{" + b" " * LIMIT + b"}",
                                 headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


async def test_a_chunked_body_within_the_limit_is_served(client, parts):
    async def small() -> AsyncIterator[bytes]:
        yield b'{"q": '
        yield b'"rivers"}'

    response = await client.post("/api/v1/search/", content=small(),
                                 headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert parts[0].searches[0][0].q == "rivers"


async def test_the_key_is_checked_only_under_api(client, parts):
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/openapi.json")).status_code == 200
    assert parts[1].checked == []


async def test_body_limit_drops_what_the_app_sends_after_the_413():
    """The inner app (Serve's proxy, in front of a replica) may still answer after the limit."""
    sent: list[dict[str, Any]] = []

    async def eager_app(scope, receive, send):
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.start", "status": 499, "headers": []})
        await send({"type": "http.response.body", "body": b"client went away"})

    chunks = iter([b"x" * 40_000, b"x" * 40_000, b"x" * 40_000])

    async def receive():
        return {"type": "http.request", "body": next(chunks), "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await BodyLimit(eager_app, max_bytes=LIMIT)(scope, receive, send)
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]
    assert b"client went away" not in b"".join(m.get("body", b"") for m in sent)


def test_proxy_middlewares_read_the_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("DTRAG_MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("DTRAG_MAX_CANDIDATE_BYTES", "99999")
    inner, outer = proxy_middlewares()
    assert inner.cls is BodyLimit
    assert inner.kwargs == {"max_bytes": 1234, "larger": {"/api/v1/admin/policy/promote": 99999}}
    assert outer.cls is RequestContext


# -- request ids and error bodies ----------------------------------------------------------

async def test_a_sane_request_id_is_kept_and_echoed(client, caplog):
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-Request-Id": "trace-42.a:b"})
    assert assert_error(response, 401, "unauthorized")["request_id"] == "trace-42.a:b"
    assert [r.request_id for r in caplog.records if r.msg == "request failed"] == ["trace-42.a:b"]


@pytest.mark.parametrize("incoming", ["", "a" * 200, "has space", "<script>", "ünï".encode("latin-1")])
async def test_an_insane_request_id_is_replaced(client, incoming):
    response = await client.get("/nowhere", headers={"X-Request-Id": incoming})
    body = assert_error(response, 404, "not_found")
    assert body["request_id"] != incoming and len(body["request_id"]) == 32


async def test_successes_carry_the_request_id_header_too(client):
    response = await client.get("/health")
    assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32
    assert len(response.headers.get_list("x-request-id")) == 1


async def test_an_unhandled_exception_is_a_generic_500_json_and_logged_with_its_id(client, parts, caplog):
    parts[0].failure = RuntimeError("asyncpg said: relation secret_table, pid=4242")
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
    body = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "pid" not in response.text and "Traceback" not in response.text
    (line,) = [r for r in caplog.records if r.msg == "request failed"]
    assert line.request_id == body["request_id"] and line.status == 500
    assert "secret_table" in line.detail and "Traceback" in line.detail


async def test_a_remote_ray_error_shows_only_our_message(client, parts, caplog):
    cause = ServiceUnavailable("lexical retrieval: database unavailable; retry shortly")
    remote = RayTaskError("search", "\x1b[36mray::ServeReplica\x1b[0m (pid=4242, ip=10.1.2.3)\nTraceback (most "
                          "recent call last):\n  asyncpg.exceptions.ConnectionDoesNotExistError: connection was "
                          "closed", cause, pid=4242, ip="10.1.2.3").as_instanceof_cause()
    parts[0].failure = remote
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
    body = assert_error(response, 503, "service_unavailable")
    assert body["message"] == "lexical retrieval: database unavailable; retry shortly"
    for leak in ("Traceback", "pid=", "\x1b", "10.1.2.3", "asyncpg", "ConnectionDoesNotExist"):
        assert leak not in response.text
    (line,) = [r for r in caplog.records if r.msg == "request failed"]
    assert line.request_id == body["request_id"] and "ConnectionDoesNotExistError" in line.detail
    assert "\x1b" not in line.detail


async def test_a_lost_database_during_the_key_check_is_503_without_driver_text(client, parts, caplog):
    parts[1].down = True
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
    assert assert_error(response, 503, "service_unavailable")["message"].startswith("API key check")
    assert "10.1.2.3" not in response.text and "Errno" not in response.text
    (line,) = [r for r in caplog.records if r.msg == "request failed"]
    assert "ConnectionRefusedError" in line.detail


async def answered_by_an_inner_layer(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
    """What a client gets through the edge when the layer inside it (Serve's proxy) answers itself."""
    async def proxy(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=RequestContext(proxy)),
                                 base_url="http://test") as client:
        return await client.get("/")


async def test_a_plain_text_error_from_an_inner_layer_becomes_json():
    """Serve's proxy answers some failures itself, in plain text."""
    response = await answered_by_an_inner_layer(
        503, b"Service Unavailable: replica at 10.1.2.3", [(b"content-type", b"text/plain"), (b"retry-after", b"1")])
    body = assert_error(response, 503, "service_unavailable")
    assert body["message"] == "the service is unavailable or overloaded; retry shortly"
    assert "10.1.2.3" not in response.text and response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    assert body.keys() == {"error", "message", "request_id"}


async def test_an_error_answered_inside_is_logged_once_not_again_at_the_outer_edge(caplog):
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")
    inner = RequestContext(error_response(401, "missing X-API-Key header"))
    transport = httpx.ASGITransport(app=RequestContext(inner))  # the proxy's edge in front of the replica's
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/", headers={"X-Request-Id": "r-1"})
    assert_error(response, 401, "unauthorized")
    assert response.headers.get_list("x-request-id") == ["r-1"]
    assert [r.request_id for r in caplog.records if r.msg == "request failed"] == ["r-1"]


async def test_a_json_report_with_an_error_status_is_kept(client, parts, caplog):
    """/health answers 503 with its report, not an `ErrorBody`; the report stays, with the id."""
    caplog.set_level(logging.INFO, logger="cluster.platform.edge")

    async def down() -> Health:
        return Health("test", False, "the database did not answer", {"control": False, "treatment": False},
                      {"rollout_control": True})

    parts[0].health = down
    response = await client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["database"] == {"ready": False, "error": "the database did not answer"}
    assert body["down"] == ["database", "arms.control", "arms.treatment"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert [(r.status, r.error) for r in caplog.records if r.msg == "request failed"] == [(503, "service_unavailable")]


async def test_health_is_200_while_one_arm_serves_and_names_what_is_down(client, parts):
    async def degraded() -> Health:
        return Health("test", True, None, {"control": True, "treatment": False},
                      {"rollout_control": True, "learning_state": False, "learner_driver": True})

    parts[0].health = degraded
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["down"] == ["arms.treatment", "actors.learning_state"]
    assert body["cluster"] == {"ready": False, "arms": {"control": True, "treatment": False}}
    assert body["actors"] == {"rollout_control": True, "learning_state": False, "learner_driver": True}


@pytest.mark.parametrize(("failure", "retry_after"), [
    (ServiceUnavailable("an arm is restarting"), "1"),
    (DatabaseUnavailable("search: database unavailable; retry shortly"), "2"),
    (PoolExhausted("no database connection came free within 2 s"), "1"),
])
async def test_every_503_says_when_to_retry(client, parts, failure, retry_after):
    parts[0].failure = failure
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
    assert_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == retry_after


async def test_a_503_from_serves_proxy_gains_a_retry_after():
    response = await answered_by_an_inner_layer(503, b"Service Unavailable", [])
    assert_error(response, 503, "service_unavailable")
    assert response.headers["retry-after"] == "1"


async def test_a_search_past_the_deadline_is_504_json(client, parts):
    parts[0].failure = DeadlineExceeded("the search did not finish within the 15 s deadline")
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
    assert "deadline" in assert_error(response, 504, "gateway_timeout")["message"]


async def test_a_key_over_its_rate_is_429_with_retry_after_before_the_body_is_read(parts):
    backend, verifier, _ = parts
    now = [0.0]
    limiter = RateLimiter(rate_per_s=0.5, burst=2, clock=lambda: now[0])
    app = create_api(backend, verifier, max_body_bytes=LIMIT, limiter=limiter)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for _ in range(2):
            ok = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})
            assert ok.status_code == 200
        body = Chunks(1024 * 1024)
        refused = await client.post("/api/v1/search/", content=body.__aiter__(), headers={"X-API-Key": KEY})
        assert "rate limit" in assert_error(refused, 429, "too_many_requests")["message"]
        assert refused.headers["retry-after"] == "2" and body.pulled == 0
        assert (await client.get("/health")).status_code == 200  # not keyed, not limited
        now[0] = 2.0
        assert (await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": KEY})).status_code == 200
    assert len(backend.searches) == 3


async def test_a_nonstandard_status_gets_a_generic_body():
    assert_error(await answered_by_an_inner_layer(499, b"", []), 499, "http_error")


async def test_validation_errors_keep_their_fields_and_gain_the_id(client):
    response = await client.post("/api/v1/search/", json={"q": "x", "final_topk": 0}, headers={"X-API-Key": KEY})
    body = assert_error(response, 422, "invalid_request")
    assert [e["field"] for e in body["errors"]] == ["final_topk"]


# -- control characters --------------------------------------------------------------------

@pytest.mark.parametrize(("path", "method", "body", "field"), [
    ("/api/v1/search/", "POST", {"q": "rivers\x00"}, "q"),
    ("/api/v1/search/", "POST", {"q": "a\x1bb"}, "q"),
    ("/api/v1/search/", "POST", {"q": "a\x7fb"}, "q"),
    ("/api/v1/search/", "POST", b'{"q": "a\\ud800b"}', "q"),  # JSON's escape for an unpaired surrogate
    ("/api/v1/rank", "POST", {"q": "\x00"}, "q"),
    ("/api/v1/feedback", "POST", {"search_id": "0" * 31 + "\x00", "clicks": []}, "search_id"),
    ("/api/v1/feedback", "POST", {"search_id": "0" * 32, "clicks": ["d1\x00"]}, "clicks.0"),
    ("/api/v1/feedback", "POST", {"search_id": "0" * 32, "judgements": {"d\t1": 2}}, "judgements.d\\u0009"),
    ("/api/v1/admin/rollout/rollback", "POST", {"reason": "guard\x00"}, "reason"),
    ("/api/v1/admin/flags", "PUT", {"flags": {"soft_q_bandit\x00": True}}, "flags.soft_q_bandit\\u0000"),
])
async def test_control_characters_are_422_naming_the_field(client, parts, path, method, body, field):
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    if isinstance(body, bytes):
        response = await client.request(method, path, content=body, headers=headers)
    else:
        response = await client.request(method, path, json=body, headers=headers)
    payload = assert_error(response, 422, "invalid_request")
    fields = [e["field"] for e in payload["errors"]]
    assert any(f.startswith(field) for f in fields), fields
    assert field in payload["message"]
    assert "\x00" not in response.text
    assert parts[0].searches == [] and parts[2].calls == []


@pytest.mark.parametrize("header", ["X-User-Id", "X-Session-Id"])
async def test_control_characters_in_caller_headers_are_422_naming_the_header(client, parts, header):
    response = await client.post("/api/v1/search/", json={"q": "x"},
                                 headers={"X-API-Key": KEY, header: "user\x01"})
    payload = assert_error(response, 422, "invalid_request")
    assert payload["errors"][0]["field"] == f"header.{header.lower()}"
    assert parts[0].searches == []


def test_the_message_says_which_character_and_where():
    from pydantic import TypeAdapter, ValidationError

    from serve_app.schemas import Identifier, Text

    with pytest.raises(ValidationError, match=r"control characters .*U\+0000 at position 3"):
        TypeAdapter(Text).validate_python("abc\x00")
    with pytest.raises(ValidationError, match=r"U\+0009 at position 1"):
        TypeAdapter(Identifier).validate_python("a\tb")
    with pytest.raises(ValidationError, match=r"U\+0085"):
        TypeAdapter(Text).validate_python("a\x85b")  # C1 (NEL)
    assert TypeAdapter(Text).validate_python("tab\tnew\nline ünï") == "tab\tnew\nline ünï"


async def test_text_keeps_tabs_and_newlines(client, parts):
    response = await client.post("/api/v1/search/", json={"q": "glacier\tmelt\nrate"}, headers={"X-API-Key": KEY})
    assert response.status_code == 200, response.text
    assert parts[0].searches[0][0].q == "glacier\tmelt\nrate"
    response = await client.post("/api/v1/admin/rollout/rollback", json={"reason": "p95\tup\nagain"},
                                 headers={"X-API-Key": KEY})
    assert response.status_code == 200 and parts[2].calls == [("rollback", "p95\tup\nagain")]


async def test_a_key_with_control_characters_is_401_without_a_lookup(client, parts):
    verifier = parts[1]
    response = await client.post("/api/v1/search/", json={"q": "x"}, headers={"X-API-Key": "dtrag_ab\x00_x"})
    assert_error(response, 401, "unauthorized")
    assert verifier.checked == ["dtrag_ab\x00_x"]  # the real verifier's format check is tested below


def test_the_key_format_admits_only_what_create_key_makes():
    from cluster.platform.api_keys import _split

    assert _split("dtrag_0123456789ab_Ab-9_z") == ("0123456789ab", "Ab-9_z")
    for bad in ("dtrag_ab\x00_x", "dtrag_ab_x\x00", "dtrag__x", "dtrag_ab_", "other_ab_x", "dtrag_AB_x"):
        assert _split(bad) is None, bad


async def test_many_concurrent_refusals_do_not_read_bodies(client):
    bodies = [Chunks(1024 * 1024) for _ in range(20)]
    responses = await asyncio.gather(*(client.post("/api/v1/search/", content=b.__aiter__()) for b in bodies))
    assert {r.status_code for r in responses} == {401}
    assert sum(b.pulled for b in bodies) == 0
