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

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster import __version__
from cluster.actors.rollout_control import RolloutError
from cluster.core.vocabulary import Arm
from cluster.platform.api_keys import ApiKeyVerifier, Principal
from cluster.platform.errors import ServiceUnavailable
from serve_app.feedback import UnknownSearch
from serve_app.pipeline import SearchEvent
from serve_app.schemas import (
    ErrorBody,
    FaultUpdate,
    FeedbackRequest,
    FeedbackResponse,
    FlagsUpdate,
    RankRequest,
    RankResponse,
    RollbackRequest,
    SearchRequest,
    SearchResponse,
    WeightUpdate,
)

MAX_BODY_BYTES = 64 * 1024
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Health:
    environment: str
    database_ready: bool
    database_error: str | None
    cluster: dict[str, bool]

    @property
    def ready(self) -> bool:
        return self.database_ready and all(self.cluster.values())


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


def _error(status: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status)


def _field(error: dict[str, Any]) -> str:
    """`("body", "final_topk")` -> `final_topk`; the body as a whole (e.g. bad JSON) is `body`."""
    if error.get("type") == "json_invalid":
        return "body"
    path = [str(part) for part in error.get("loc", ()) if part != "body"]
    return ".".join(path) or "body"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e), "message": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return _error(422, "invalid_request", summary, errors=errors)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
             413: "payload_too_large"}
    response = _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return _error(503, "service_unavailable", str(exc))


async def _unknown_search(_: Request, exc: Exception) -> JSONResponse:
    return _error(404, "not_found", str(exc))


async def _conflict(_: Request, exc: Exception) -> JSONResponse:
    return _error(409, "conflict", str(exc.args[0]) if exc.args else str(exc))


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
            log.exception("streamed search failed after it started")
            yield _sse(SearchEvent("error", {"error": "stream_failed",
                                             "message": "the search failed after it started; retry"}))
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_STREAM_DOC = ("With `stream: true`: text/event-stream of `hits` (the search without its answer), `delta` "
               "(`{\"text\"}`, answer text as it is written) and a final `answer` (the answer object, plus "
               "`search_latency_ms`); `error` if it fails after it started.")


class BodySizeLimit:
    """Reject bodies over `limit` bytes with 413 before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                response = _error(413, "payload_too_large",
                                  f"request body must be at most {self.limit} bytes")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_api(
    backend: SearchBackend, verifier: ApiKeyVerifier, operations: Operations | None = None
) -> FastAPI:
    """The API; the admin flag and rollout routes exist only when `operations` is given."""
    app = FastAPI(
        title="DT-RAG search",
        version=__version__,
        description="Retrieval-augmented search that learns which retrieval strategy suits each query.",
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 503: {"model": ErrorBody}},
    )
    app.add_middleware(BodySizeLimit)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(UnknownSearch, _unknown_search)
    app.add_exception_handler(RolloutError, _conflict)

    def require(scope: str):
        async def check(request: Request) -> Principal:
            token = request.headers.get("x-api-key")
            if not token:
                raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
            principal = await verifier.verify(token)
            if principal is None:
                raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "ApiKey"})
            if scope not in principal.scopes:
                raise HTTPException(403, f"this API key lacks the '{scope}' scope")
            return principal

        return check

    require_search = require("search")
    require_admin = require("admin")

    @app.get("/health", summary="Liveness and readiness of the database and the arms")
    async def health() -> JSONResponse:
        report = await backend.health()
        body = {
            "status": "ok" if report.ready else "unavailable",
            "version": __version__,
            "environment": report.environment,
            "database": {"ready": report.database_ready, "error": report.database_error},
            "cluster": {"ready": all(report.cluster.values()), "arms": report.cluster},
        }
        return JSONResponse(body, status_code=200 if report.database_ready else 503)

    @app.post("/api/v1/search/", response_model=SearchResponse, summary="Search and answer",
              responses={200: {"content": {"text/event-stream": {}}, "description": _STREAM_DOC}})
    async def search(
        body: SearchRequest,
        principal: Principal = Depends(require_search),
        x_user_id: str | None = Header(None, max_length=128,
                                       description="Keeps a user on one arm (keys with the name_users scope only)."),
        x_session_id: str | None = Header(None, max_length=128, description="Links a session's queries."),
    ) -> SearchResponse | StreamingResponse:
        caller = Caller(x_user_id, x_session_id)
        if body.stream:
            return await _event_stream(backend.search_events(body, principal, caller))
        return await backend.search(body, principal, caller)

    @app.post("/api/v1/feedback", response_model=FeedbackResponse,
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

    @app.post("/api/v1/admin/rollout/advance", dependencies=admin, summary="Move to the next stage")
    async def rollout_advance() -> dict[str, Any]:
        return await operations.advance()

    @app.post("/api/v1/admin/rollout/rollback", dependencies=admin, summary="Treatment to 0% now")
    async def rollout_rollback(body: RollbackRequest) -> dict[str, Any]:
        return await operations.rollback(body.reason)

    @app.put("/api/v1/admin/rollout/weight", dependencies=admin, summary="Set the treatment's share")
    async def rollout_weight(body: WeightUpdate) -> dict[str, Any]:
        return await operations.set_weight(body.treatment_weight)

    @app.put("/api/v1/admin/faults", dependencies=admin,
             summary="Make an arm fail on purpose (only with ENVIRONMENT=test)")
    async def faults(body: FaultUpdate) -> dict[str, Any]:
        return await operations.set_fault(body.arm, body.failing)
