"""Local servers that speak the Gemini REST API and OpenAI chat completions, for tests with no network.

The real SDKs reach them through their base-URL options; what they answer is programmable per
test: a fixed delay, failures with a status (429 with `Retry-After`, 500) for the first calls,
malformed bodies, hanging, the text and the token counts. They listen on 127.0.0.1 only and
record every call, with the API key each one carried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEFAULT_TEXT = "The passages answer it [1], with more detail in another [2]."


@dataclasses.dataclass
class Behaviour:
    """How the server answers; tests change it between (not during) requests."""

    delay_s: float = 0.0  # before answering (a stream spreads it over its chunks)
    delay_by_call: tuple[float, ...] = ()  # call n (from 1) waits delay_by_call[n - 1] instead
    fail_first: int = 0  # the first N calls fail with `status`
    status: int = 500
    retry_after: str | None = None  # sent with failures
    malformed: bool = False  # 200 with a body that is not the protocol's JSON
    hang: bool = False  # never answer
    text: str = DEFAULT_TEXT  # `{stance}` is replaced by the system prompt's last sentence
    input_tokens: int = 120
    output_tokens: int = 30
    chunks: int = 4  # pieces of a streamed answer


@dataclasses.dataclass(frozen=True)
class Call:
    path: str
    api_key: str | None
    body: dict
    at: float  # time.monotonic() when it arrived


class ModelServer:
    """Both protocols on one port: `gemini_base_url` and `openai_base_url` point the SDKs here."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.calls: list[Call] = []
        self.streams_cut = 0  # streamed answers whose client went away before the end
        self._lock = threading.Lock()
        app = Starlette(routes=[
            Route("/{api_version}/models/{model_action:path}", self._gemini, methods=["POST"]),  # v1, v1beta
            Route("/v1/chat/completions", self._openai, methods=["POST"]),
        ])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def gemini_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ModelServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the model server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    def reset(self, **behaviour: object) -> None:
        with self._lock:
            self.behaviour = Behaviour(**behaviour)  # type: ignore[arg-type]
            self.calls = []
            self.streams_cut = 0

    # -- shared --------------------------------------------------------------------------------
    async def _begin(self, request: Request, api_key: str | None) -> tuple[Behaviour, dict, Response | None]:
        """Record the call; a failure or malformed answer when the behaviour says so."""
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        with self._lock:
            self.calls.append(Call(request.url.path, api_key, body, time.monotonic()))
            number = len(self.calls)
            behaviour = self.behaviour
        if number <= len(behaviour.delay_by_call):
            behaviour = dataclasses.replace(behaviour, delay_s=behaviour.delay_by_call[number - 1])
        if behaviour.hang:
            await asyncio.sleep(3600)
        if number <= behaviour.fail_first:
            await asyncio.sleep(behaviour.delay_s)
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
            error = {"error": {"code": behaviour.status, "message": "injected failure", "status": "UNAVAILABLE"}}
            return behaviour, body, JSONResponse(error, status_code=behaviour.status, headers=headers)
        if behaviour.malformed:
            await asyncio.sleep(behaviour.delay_s)
            return behaviour, body, Response("{this is not json", media_type="application/json")
        return behaviour, body, None

    @staticmethod
    def _text(behaviour: Behaviour, system: str) -> str:
        stance = re.split(r"(?<=[.!?])\s+", system.strip())[-1] if system else ""
        return behaviour.text.replace("{stance}", stance)

    async def _stream(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`events`, counting a stream the client leaves before its end."""
        finished = False
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            if not finished:
                with self._lock:
                    self.streams_cut += 1

    @staticmethod
    def _pieces(text: str, chunks: int) -> list[str]:
        size = max(1, -(-len(text) // chunks))
        return [text[i:i + size] for i in range(0, len(text), size)]

    # -- Gemini --------------------------------------------------------------------------------
    async def _gemini(self, request: Request) -> Response:
        behaviour, body, failure = await self._begin(request, request.headers.get("x-goog-api-key"))
        if failure is not None:
            return failure
        system = " ".join(p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts", []))
        text = self._text(behaviour, system)
        usage = {"promptTokenCount": behaviour.input_tokens, "candidatesTokenCount": behaviour.output_tokens,
                 "totalTokenCount": behaviour.input_tokens + behaviour.output_tokens}

        def response(piece: str, last: bool) -> dict:
            candidate = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}
            if last:
                candidate["finishReason"] = "STOP"
            return {"candidates": [candidate], **({"usageMetadata": usage} if last else {})}

        if request.path_params["model_action"].endswith(":streamGenerateContent"):
            pieces = self._pieces(text, behaviour.chunks)

            async def events() -> AsyncIterator[bytes]:
                for i, piece in enumerate(pieces):
                    await asyncio.sleep(behaviour.delay_s / len(pieces))
                    yield f"data: {json.dumps(response(piece, i == len(pieces) - 1))}\r\n\r\n".encode()

            return StreamingResponse(self._stream(events()), media_type="text/event-stream")
        await asyncio.sleep(behaviour.delay_s)
        return JSONResponse(response(text, True))

    # -- OpenAI --------------------------------------------------------------------------------
    async def _openai(self, request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        behaviour, body, failure = await self._begin(request, authorization.removeprefix("Bearer ") or None)
        if failure is not None:
            return failure
        system = " ".join(m["content"] for m in body.get("messages", []) if m.get("role") == "system")
        text = self._text(behaviour, system)
        usage = {"prompt_tokens": behaviour.input_tokens, "completion_tokens": behaviour.output_tokens,
                 "total_tokens": behaviour.input_tokens + behaviour.output_tokens}
        base = {"id": "chatcmpl-local", "created": int(time.time()), "model": body.get("model", "local")}
        if body.get("stream"):
            pieces = self._pieces(text, behaviour.chunks)

            async def events() -> AsyncIterator[bytes]:
                for piece in pieces:
                    await asyncio.sleep(behaviour.delay_s / len(pieces))
                    chunk = {**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                final = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(final)}\n\n".encode()
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(self._stream(events()), media_type="text/event-stream")
        await asyncio.sleep(behaviour.delay_s)
        return JSONResponse({**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
