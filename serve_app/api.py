"""The HTTP API: routes, key checks and error bodies, over any `SearchBackend`.

The Serve ingress and the single-process baseline both serve this same app; only the backend
differs (Serve handles to arms, or a pipeline in-process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from cluster import __version__
from cluster.actors.rollout_control import RolloutError
from cluster.core.vocabulary import Arm
from cluster.platform.api_keys import ApiKeyVerifier, Principal
from cluster.platform.edge import (
    ApiKeyGate,
    CANDIDATE_PATH,
    BodyLimit,
    RateLimit,
    RequestContext,
    current_request_id,
    error_response,
    public_cause,
    record_failure,
    unavailable_response,
)
from cluster.core.rate_limit import RateLimiter
from cluster.platform.errors import DeadlineExceeded, Refused, ServiceUnavailable
from learners.candidate import CandidateError
from serve_app.feedback import UnknownSearch
from serve_app.pipeline import SearchEvent
from serve_app.schemas import (
    CONTROL_CHARACTERS,
    ErrorBody,
    FaultUpdate,
    FeedbackRequest,
    FeedbackResponse,
    FlagsUpdate,
    Identifier,
    RankRequest,
    RankResponse,
    RollbackRequest,
    SearchRequest,
    SearchResponse,
    WeightUpdate,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Health:
    environment: str
    database_ready: bool
    database_error: str | None
    cluster: dict[str, bool]  # arm -> whether it can serve (its replicas answer and reach the database)
    actors: dict[str, bool] = dataclasses.field(default_factory=dict)  # actor -> whether it answers

    @property
    def serving(self) -> bool:
        """At least one arm can serve: the service answers searches (503 otherwise)."""
        return any(self.cluster.values())

    def down(self) -> list[str]:
        """What is down, e.g. `arms.treatment`, `actors.learner_driver`, `database`."""
        return ([] if self.database_ready else ["database"]) + [
            f"{kind}.{name}" for kind, parts in (("arms", self.cluster), ("actors", self.actors))
            for name, ok in parts.items() if not ok]

    def body(self, version: str) -> dict[str, Any]:
        """The report, one shape whether 200 or 503: `ok`, `degraded` (some part down, searches
        served) or `unavailable` (no arm can serve)."""
        down = self.down()
        return {
            "status": "unavailable" if not self.serving else "degraded" if down else "ok",
            "version": version,
            "environment": self.environment,
            "database": {"ready": self.database_ready, "error": self.database_error},
            "cluster": {"ready": all(self.cluster.values()), "arms": self.cluster},
            "actors": self.actors,
            "down": down,
        }


@dataclasses.dataclass(frozen=True)
class Caller:
    """Optional headers that describe the caller: who (for sticky arms) and which session."""

    user_id: str | None = None
    session_id: str | None = None


class SearchBackend(Protocol):
    async def search(self, request: SearchRequest, principal: Principal, caller: Caller) -> SearchResponse: ...

    def search_events(self, request: SearchRequest, principal: Principal, caller: Caller) -> AsyncIterator[SearchEvent]: ...

    async def rank(self, request: RankRequest, principal: Principal) -> RankResponse: ...

    async def feedback(self, request: FeedbackRequest, principal: Principal) -> FeedbackResponse: ...

    async def learning(self) -> dict[str, Any]: ...

    async def reset_learning(self) -> dict[str, Any]: ...

    async def health(self) -> Health: ...


class Operations(Protocol):
    """Flags and rollout, for operators (admin scope)."""

    async def flags(self) -> dict[str, Any]: ...

    async def set_flags(self, arm: Arm, flags: dict[str, bool]) -> dict[str, Any]: ...

    async def rollout_status(self) -> dict[str, Any]: ...

    async def advance(self) -> dict[str, Any]: ...

    async def rollback(self, reason: str) -> dict[str, Any]: ...

    async def set_weight(self, weight: float) -> dict[str, Any]: ...

    async def set_fault(self, arm: Arm, failing: bool) -> dict[str, Any]: ...

    async def promote_policy(self, candidate: bytes, principal: Principal, force: bool) -> dict[str, Any]: ...

    async def rollback_policy(self, principal: Principal) -> dict[str, Any]: ...

    async def policy_history(self, limit: int) -> list[dict[str, Any]]: ...


def _field(error: dict[str, Any]) -> str:
    """`("body", "final_topk")` -> `final_topk`; the body as a whole (e.g. bad JSON) is `body`.

    Control characters in a part (a dict key the caller sent) are escaped, not echoed.
    """
    if error.get("type") == "json_invalid":
        return "body"
    path = [CONTROL_CHARACTERS.sub(lambda m: f"\\u{ord(m[0]):04x}", str(part))
            for part in error.get("loc", ()) if part != "body"]
    return ".".join(path) or "body"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e), "message": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return error_response(422, summary, errors=errors)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return unavailable_response(exc)


async def _deadline(_: Request, exc: Exception) -> JSONResponse:
    record_failure(exc)
    return error_response(504, str(exc))


async def _unknown_search(_: Request, exc: Exception) -> JSONResponse:
    return error_response(404, str(public_cause(exc)))


async def _unusable_candidate(_: Request, exc: Exception) -> JSONResponse:
    return error_response(422, str(public_cause(exc)))


async def _conflict(_: Request, exc: Exception) -> JSONResponse:
    cause = public_cause(exc)
    return error_response(409, str(cause.args[0]) if cause.args else str(cause))


_UNKNOWN_SEARCH: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such search."}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorBody, "description": "Refused in the current state."}}


def _sse(event: SearchEvent) -> bytes:
    return f"event: {event.name}\ndata: {json.dumps(event.data)}\n\n".encode()


async def _event_stream(events: AsyncIterator[SearchEvent]) -> StreamingResponse:
    """Server-Sent Events from `events`. A failure before the first event is an ordinary error
    response; once streaming, it becomes a last `error` event. A caller who disconnects closes
    `events`, which cancels the search and its provider calls."""
    first = await anext(events)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _sse(first)
            async for event in events:
                yield _sse(event)
        except Exception:
            log.exception("streamed search failed after it started", extra={"request_id": current_request_id()})
            yield _sse(SearchEvent("error", {"error": "stream_failed",
                                             "message": "the search failed after it started; retry"}))
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_STREAM_DOC = ("With `stream: true`: text/event-stream of `hits` (the search without its answer), `delta` "
               "(`{\"text\"}`, answer text as it is written) and a final `answer` (the answer object, plus "
               "`search_latency_ms`); `error` if it fails after it started.")


def create_api(
    backend: SearchBackend, verifier: ApiKeyVerifier, *, max_body_bytes: int, operations: Operations | None = None,
    max_candidate_bytes: int | None = None,
    limiter: RateLimiter | None = None,
) -> FastAPI:
    """The API; the admin flag, rollout and policy routes exist only when `operations` is given.

    The edge (outermost first): request ids and JSON errors, the body limit, the key check, then
    the key's rate limit (none without `limiter`), all before FastAPI reads the body.
    """
    app = FastAPI(
        title="DT-RAG search",
        version=__version__,
        description="Retrieval-augmented search that learns which retrieval strategy suits each query.",
        responses={status: {"model": ErrorBody} for status in (400, 401, 403, 413, 429, 503, 504)},
    )
    if limiter is not None and limiter.enabled:
        app.add_middleware(RateLimit, limiter=limiter)
    app.add_middleware(ApiKeyGate, verifier=verifier)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes,
                       larger={CANDIDATE_PATH: max_candidate_bytes} if operations and max_candidate_bytes else None)
    app.add_middleware(RequestContext)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(DeadlineExceeded, _deadline)
    app.add_exception_handler(UnknownSearch, _unknown_search)
    app.add_exception_handler(RolloutError, _conflict)
    app.add_exception_handler(Refused, _conflict)
    app.add_exception_handler(CandidateError, _unusable_candidate)

    def require(scope: str):
        async def check(request: Request) -> Principal:
            principal: Principal | None = getattr(request.state, "principal", None)  # set by ApiKeyGate
            if principal is None:
                raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
            if scope not in principal.scopes:
                raise HTTPException(403, f"this API key lacks the '{scope}' scope")
            return principal

        return check

    require_search = require("search")
    require_admin = require("admin")

    @app.get("/health", summary="Readiness of each arm, each actor and the database; 503 when no arm can serve")
    async def health() -> JSONResponse:
        report = await backend.health()
        return JSONResponse(report.body(__version__), status_code=200 if report.serving else 503)

    @app.post("/api/v1/search/", response_model=SearchResponse, summary="Search and answer",
              responses={200: {"content": {"text/event-stream": {}}, "description": _STREAM_DOC}})
    async def search(
        body: SearchRequest,
        principal: Principal = Depends(require_search),
        x_user_id: Identifier | None = Header(
            None, max_length=128, description="Keeps a user on one arm (keys with the name_users scope only)."),
        x_session_id: Identifier | None = Header(None, max_length=128, description="Links a session's queries."),
    ) -> SearchResponse | StreamingResponse:
        caller = Caller(x_user_id, x_session_id)
        if body.stream:
            return await _event_stream(backend.search_events(body, principal, caller))
        return await backend.search(body, principal, caller)

    @app.post("/api/v1/feedback", response_model=FeedbackResponse, responses=_UNKNOWN_SEARCH,
              summary="Judge a served result list; its nDCG becomes the reward")
    async def feedback(body: FeedbackRequest, principal: Principal = Depends(require_search)) -> FeedbackResponse:
        return await backend.feedback(body, principal)

    @app.get("/api/v1/admin/learning", summary="The policy's model, replay and learner counters")
    async def learning(principal: Principal = Depends(require_admin)) -> dict[str, Any]:
        return await backend.learning()

    @app.post("/api/v1/admin/learning/reset", summary="Forget what the policy learned (a fresh model)")
    async def reset_learning(principal: Principal = Depends(require_admin)) -> dict[str, Any]:
        return await backend.reset_learning()

    @app.post("/api/v1/rank", response_model=RankResponse,
              summary="Ranked document ids only (deeper than search; for evaluation)")
    async def rank(body: RankRequest, principal: Principal = Depends(require_search)) -> RankResponse:
        return await backend.rank(body, principal)

    if operations is not None:
        _add_operations(app, operations, require_admin)
    return app


def _add_operations(app: FastAPI, operations: Operations, require_admin) -> None:
    admin = [Depends(require_admin)]

    @app.get("/api/v1/admin/flags", dependencies=admin, summary="Flags of each arm, and what each does")
    async def get_flags() -> dict[str, Any]:
        return await operations.flags()

    @app.put("/api/v1/admin/flags", dependencies=admin, summary="Turn flags on or off for one arm")
    async def put_flags(body: FlagsUpdate) -> dict[str, Any]:
        return await operations.set_flags(body.arm, dict(body.flags))

    @app.get("/api/v1/admin/rollout", dependencies=admin, summary="Stage, weights, per-arm gates and events")
    async def rollout_status() -> dict[str, Any]:
        return await operations.rollout_status()

    @app.post("/api/v1/admin/rollout/advance", dependencies=admin, responses=_CONFLICT,
              summary="Move to the next stage")
    async def rollout_advance() -> dict[str, Any]:
        return await operations.advance()

    @app.post("/api/v1/admin/rollout/rollback", dependencies=admin, responses=_CONFLICT,
              summary="Treatment to 0% now")
    async def rollout_rollback(body: RollbackRequest) -> dict[str, Any]:
        return await operations.rollback(body.reason)

    @app.put("/api/v1/admin/rollout/weight", dependencies=admin, responses=_CONFLICT,
             summary="Set the treatment's share")
    async def rollout_weight(body: WeightUpdate) -> dict[str, Any]:
        return await operations.set_weight(body.treatment_weight)

    @app.put("/api/v1/admin/faults", dependencies=admin, responses=_CONFLICT,
             summary="Make an arm fail on purpose (only with ENVIRONMENT=test)")
    async def faults(body: FaultUpdate) -> dict[str, Any]:
        return await operations.set_fault(body.arm, body.failing)

    @app.post(CANDIDATE_PATH, summary="Judge a candidate policy against the live one, then serve it",
              responses={**_CONFLICT, 422: {"model": ErrorBody}},
              description="The body is a candidate policy file (`python -m cluster.jobs.train`). Refused (409) when "
                          "it is estimated worse than the live policy by more than the margin, or too few logged "
                          "searches can judge it, unless `force`; 422 when it does not fit this service.",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def promote_policy(request: Request, force: bool = False,
                             principal: Principal = Depends(require_admin)) -> dict[str, Any]:
        return await operations.promote_policy(await request.body(), principal, force)

    @app.post("/api/v1/admin/policy/rollback", responses=_CONFLICT,
              summary="Serve the policy the latest promotion replaced")
    async def rollback_policy(principal: Principal = Depends(require_admin)) -> dict[str, Any]:
        return await operations.rollback_policy(principal)

    @app.get("/api/v1/admin/policy/history", dependencies=admin,
             summary="Promotions and rollbacks, newest first: who, when, and the judgement")
    async def policy_history(limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        return await operations.policy_history(limit)
