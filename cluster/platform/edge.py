"""The HTTP edge, as pure ASGI middleware: request ids, JSON error bodies, the body limit, the key
gate, the per-key rate limit.

They act before FastAPI reads a byte of the body, so a caller without a valid key, or with a
body over the limit, costs at most the limit's bytes. `RequestContext` and `BodyLimit` also run
in front of Serve's proxy (`proxy_middlewares`), which otherwise queues a body's chunks without
bound before any replica sees them.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import re
import traceback
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Protocol

from ray.exceptions import RayTaskError
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.core.rate_limit import RateLimiter
from cluster.platform.api_keys import Principal
from cluster.platform.errors import ServiceUnavailable

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
API_KEY_HEADER = "x-api-key"
MAX_BODY_ENV = "DTRAG_MAX_BODY_BYTES"  # how the proxy learns the limits (see `proxy_environment`)
MAX_CANDIDATE_ENV = "DTRAG_MAX_CANDIDATE_BYTES"
CANDIDATE_PATH = "/api/v1/admin/policy/promote"  # the one route whose body (a policy file) may be larger
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 413: "payload_too_large", 422: "invalid_request",
    429: "too_many_requests", 500: "internal_error", 502: "bad_gateway", 503: "service_unavailable",
    504: "gateway_timeout",
}
# For error responses that carry no body of ours (Starlette's defaults, Serve's proxy).
_GENERIC_MESSAGES = {
    404: "no such path; see /docs for the API",
    408: "the request timed out; retry",
    500: "the server failed to handle this request; report its request_id",
    502: "a replica failed to answer; retry shortly",
    503: "the service is unavailable or overloaded; retry shortly",
    504: "the request timed out; retry",
}


@dataclasses.dataclass
class _RequestState:
    id: str
    detail: str | None = None


_current: contextvars.ContextVar[_RequestState | None] = contextvars.ContextVar("dtrag_request", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled, for log lines (`extra={"request_id": ...}`)."""
    state = _current.get()
    return state.id if state else None


def record_failure(error: BaseException) -> None:
    """Keep what failed for this request's log line; the client only ever sees a safe message."""
    state = _current.get()
    if state is not None:
        state.detail = describe(error)


def describe(error: BaseException) -> str:
    """What failed, for the log: a remote error's traceback, or the chain of local causes."""
    if isinstance(error, RayTaskError):
        return _ANSI.sub("", str(error))
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None and len(parts) < 5:
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__
    return " <- ".join(parts)


def public_cause(error: BaseException) -> BaseException:
    """The exception our code raised: a Ray remote error's cause, else `error` itself.

    A `RayTaskError` prints the remote traceback (with colour codes, pid and IP); its cause
    prints only the message our code wrote for callers.
    """
    if isinstance(error, RayTaskError) and error.cause is not None:
        return error.cause
    return error


def error_response(status: int, message: str, *, error: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The documented error body (`ErrorBody`); `RequestContext` adds the request id."""
    body = {"error": error or ERROR_CODES.get(status, "http_error"), "message": message, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def unavailable_response(error: BaseException) -> JSONResponse:
    """503 for a `ServiceUnavailable`, local or raised in another Ray process, with its `Retry-After`."""
    record_failure(error)
    cause = public_cause(error)
    retry_after = getattr(cause, "retry_after_s", ServiceUnavailable.retry_after_s)
    return error_response(503, str(cause), headers={"Retry-After": str(retry_after)})


def _incoming_request_id(scope: Scope) -> str | None:
    value = Headers(scope=scope).get(REQUEST_ID_HEADER)
    return value if value is not None and _SANE_REQUEST_ID.fullmatch(value) else None


class RequestContext:
    """Give each request an id, echo it, and make every error the documented JSON carrying it.

    The id is a sane incoming `X-Request-Id` or a new one; it is written back into the request's
    headers so inner layers (Serve's proxy, the replica) use the same. Error responses are
    buffered (they are small): JSON objects (ours) gain `request_id`; anything else (Starlette's
    plain-text defaults, Serve's proxy) is replaced by a generic body. An unhandled exception
    becomes a 500 JSON. Each error response writes one log line with the id and what failed.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _RequestState(_incoming_request_id(scope) or uuid.uuid4().hex)
        MutableHeaders(scope=scope)[REQUEST_ID_HEADER] = state.id
        token = _current.set(state)
        start: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal start, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] < 400:
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = state.id
                    await send(message)
                else:
                    start = message
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_error(scope, send, state, start["status"], start, b"".join(chunks))
            else:
                await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            state.detail = "".join(traceback.format_exception(error))
            if started:  # too late for a body; the server drops the connection
                self._log(scope, state, 500, "internal_error")
                raise
            await self._send_error(scope, send, state, 500, None, b"")
        finally:
            _current.reset(token)

    async def _send_error(self, scope: Scope, send: Send, state: _RequestState, status: int,
                          start: Message | None, body: bytes) -> None:
        code = ERROR_CODES.get(status, "http_error")
        payload = _json_object(body) or {"error": code, "message": _generic_message(status)}
        logged_inside = "request_id" in payload  # by the replica, when this edge is the proxy's
        payload["request_id"] = state.id
        response = JSONResponse(payload, status_code=status)
        if start is not None:  # keep the response's own headers (WWW-Authenticate, Retry-After, ...)
            kept = [(k, v) for k, v in start.get("headers", [])
                    if k.lower() not in (b"content-length", b"content-type", REQUEST_ID_HEADER.encode())]
            response.raw_headers = kept + response.raw_headers
        response.headers[REQUEST_ID_HEADER] = state.id
        if status == 503 and "retry-after" not in response.headers:  # Serve's proxy: no replica, overloaded
            response.headers["Retry-After"] = str(ServiceUnavailable.retry_after_s)
        if not logged_inside:
            self._log(scope, state, status, str(payload.get("error", code)))
        await response(scope, _no_body, send)

    @staticmethod
    def _log(scope: Scope, state: _RequestState, status: int, error: str) -> None:
        level = logging.ERROR if status == 500 else logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "request failed", extra={
            "request_id": state.id, "status": status, "error": error, "method": scope.get("method"),
            "path": scope.get("path"), "detail": state.detail})


def _generic_message(status: int) -> str:
    if status in _GENERIC_MESSAGES:
        return _GENERIC_MESSAGES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # e.g. 499, which Serve uses for a client that went away
        return "the request failed"


def _json_object(body: bytes) -> dict[str, Any] | None:
    """An app's own JSON answer (an `ErrorBody`, or a report such as /health's); None for the rest."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, counting the bytes as they arrive, chunked or not.

    A `Content-Length` over the limit is refused before any byte is read. Past the limit the
    inner app is told the client left (so it stops reading and cancels its work) and anything it
    still sends is dropped: the caller has its 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, larger: Mapping[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.larger = dict(larger or {})  # path -> its own limit

    @staticmethod
    def _too_large(limit: int) -> JSONResponse:
        return error_response(413, f"request body must be at most {limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope["path"], self.max_bytes)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._too_large(limit)(scope, receive, send)
            return
        received, refused, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await self._too_large(limit)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


class KeyVerifier(Protocol):
    async def verify(self, token: str) -> Principal | None: ...


class ApiKeyGate:
    """Check `X-API-Key` on every path under `prefix` from the headers alone, before the body is read.

    The principal goes to `scope["state"]["principal"]` (`request.state.principal`); routes
    still check its scopes.
    """

    def __init__(self, app: ASGIApp, verifier: KeyVerifier, prefix: str = "/api/"):
        self.app = app
        self.verifier = verifier
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        token = Headers(scope=scope).get(API_KEY_HEADER)
        challenge = {"WWW-Authenticate": "ApiKey"}
        try:
            principal = await self.verifier.verify(token) if token else None
        except ServiceUnavailable as error:
            await unavailable_response(error)(scope, receive, send)
            return
        if principal is None:
            message = "invalid or revoked API key" if token else "missing X-API-Key header"
            await error_response(401, message, headers=challenge)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class RateLimit:
    """Refuse a key's requests over its rate with 429 and `Retry-After`, before the body is read.

    Runs inside `ApiKeyGate`, so only keyed requests are counted, each against its own key.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter):
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal") if scope["type"] == "http" else None
        wait_s = self.limiter.retry_after(principal.key_id) if principal is not None else 0
        if wait_s:
            message = (f"this API key is over its rate limit ({self.limiter.rate_per_s:g} requests/s, bursts of "
                       f"{self.limiter.burst}); retry after {wait_s} s")
            await error_response(429, message, headers={"Retry-After": str(wait_s)})(scope, receive, send)
            return
        await self.app(scope, receive, send)


def proxy_environment(max_body_bytes: int, max_candidate_bytes: int) -> dict[str, str]:
    """Environment for Serve's controller (inherited by its proxies) that puts our edge in front.

    Ray 2.60 removed `HTTPOptions.middlewares`; the one remaining hook is the proxy callback
    named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read in the proxy's own process.
    """
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}.{proxy_middlewares.__name__}",
            MAX_BODY_ENV: str(max_body_bytes), MAX_CANDIDATE_ENV: str(max_candidate_bytes)}


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the body limit, inside request ids and JSON errors (outermost last)."""
    return [Middleware(BodyLimit, max_bytes=int(os.environ[MAX_BODY_ENV]),
                       larger={CANDIDATE_PATH: int(os.environ[MAX_CANDIDATE_ENV])}),
            Middleware(RequestContext)]
