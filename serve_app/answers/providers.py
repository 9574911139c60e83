"""Model providers behind one async interface: Gemini (`google-genai`) or any OpenAI-compatible server.

Each provider turns its SDK's failures into `ProviderError` with an HTTP status (so the caller
retries 429 and 5xx alike) and its answers into `Generation` with token counts. Neither keeps
its key where a log line, an error or `repr` could show it; `ProviderError` messages are also
scrubbed of the key, in case a server echoes it back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from serve_app.answers.deadline import Deadline, RetryPolicy, parse_retry_after

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens)


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    usage: Usage
    refused: bool = False  # the model declined (safety stop, empty answer)


class ProviderError(Exception):
    """A provider call failed. `reason` is the answer's fallback reason; 429 and 5xx are retryable."""

    def __init__(self, message: str, *, reason: str = "provider_error", status: int | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.status is not None and (self.status == 429 or self.status >= 500)


class Provider(Protocol):
    name: str
    model: str

    async def generate(self, system: str, user: str, max_output_tokens: int, timeout_s: float) -> Generation: ...

    def stream(self, system: str, user: str, max_output_tokens: int,
               timeout_s: float) -> AsyncIterator[str | Usage]:
        """Text deltas as they arrive, then one `Usage`."""
        ...


def _scrubbed(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    return parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))


class GeminiProvider:
    """Gemini through `google-genai`'s async client; `base_url` reaches any server speaking its REST API."""

    name = "gemini"

    def __init__(self, api_key: str, model: str, base_url: str | None = None):
        from google import genai
        from google.genai import types

        self.model = model
        self._key = api_key
        self._types = types
        self._client = genai.Client(api_key=api_key,
                                    http_options=types.HttpOptions(base_url=base_url) if base_url else None)

    def __repr__(self) -> str:
        return f"GeminiProvider(model={self.model!r})"

    def _config(self, system: str, max_output_tokens: int) -> Any:
        return self._types.GenerateContentConfig(system_instruction=system, max_output_tokens=max_output_tokens)

    def _error(self, error: Exception) -> ProviderError:
        from google.genai import errors

        if isinstance(error, errors.APIError):
            return ProviderError(_scrubbed(f"gemini answered HTTP {error.code}: {error.message}", self._key),
                                 status=error.code, retry_after_s=_retry_after(error.response))
        return ProviderError(f"gemini call failed: {type(error).__name__}")  # no text: it may hold a URL

    @staticmethod
    def _usage(metadata: Any) -> Usage:
        if metadata is None:
            return Usage()
        return Usage(metadata.prompt_token_count or 0, metadata.candidates_token_count or 0)

    async def generate(self, system: str, user: str, max_output_tokens: int, timeout_s: float) -> Generation:
        try:
            response = await asyncio.wait_for(self._client.aio.models.generate_content(
                model=self.model, contents=user, config=self._config(system, max_output_tokens)), timeout_s)
            text = response.text or ""
        except TimeoutError:
            raise
        except Exception as error:  # the SDK raises its own errors, httpx/aiohttp ones, and JSON ones
            raise self._error(error) from None
        return Generation(text, self._usage(response.usage_metadata), refused=not text.strip())

    async def stream(self, system: str, user: str, max_output_tokens: int,
                     timeout_s: float) -> AsyncIterator[str | Usage]:
        usage = Usage()
        try:
            async with asyncio.timeout(timeout_s):
                chunks = await self._client.aio.models.generate_content_stream(
                    model=self.model, contents=user, config=self._config(system, max_output_tokens))
                async for chunk in chunks:
                    usage = self._usage(chunk.usage_metadata) if chunk.usage_metadata else usage
                    if chunk.text:
                        yield chunk.text
        except TimeoutError:
            raise
        except Exception as error:
            raise self._error(error) from None
        yield usage


class OpenAIProvider:
    """Chat completions through the `openai` SDK pointed at a base URL (vLLM, Ray Serve LLM, Ollama, ...)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None):
        import openai

        self.model = model
        self._key = api_key
        self._openai = openai
        # The SDK's own retries are off: ours know the deadline.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIProvider(model={self.model!r})"

    def _messages(self, system: str, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _error(self, error: Exception) -> ProviderError | TimeoutError:
        if isinstance(error, self._openai.APITimeoutError):
            return TimeoutError()
        if isinstance(error, self._openai.APIStatusError):
            return ProviderError(_scrubbed(f"model server answered HTTP {error.status_code}: {error.message}",
                                           self._key),
                                 status=error.status_code, retry_after_s=_retry_after(error.response))
        if isinstance(error, self._openai.APIConnectionError):
            return ProviderError("model server unreachable", status=503)  # transient: worth a retry
        return ProviderError(f"model server call failed: {type(error).__name__}")

    async def generate(self, system: str, user: str, max_output_tokens: int, timeout_s: float) -> Generation:
        try:
            response = await self._client.chat.completions.create(
                model=self.model, messages=self._messages(system, user), max_tokens=max_output_tokens,
                timeout=timeout_s)
            choice = response.choices[0]
            text = choice.message.content or ""
        except Exception as error:
            raise self._error(error) from None
        usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens) if response.usage else Usage()
        return Generation(text, usage, refused=choice.finish_reason == "content_filter" or not text.strip())

    async def stream(self, system: str, user: str, max_output_tokens: int,
                     timeout_s: float) -> AsyncIterator[str | Usage]:
        usage = Usage()
        try:
            async with asyncio.timeout(timeout_s):
                chunks = await self._client.chat.completions.create(
                    model=self.model, messages=self._messages(system, user), max_tokens=max_output_tokens,
                    stream=True, stream_options={"include_usage": True}, timeout=timeout_s)
                async for chunk in chunks:
                    if chunk.usage:
                        usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except TimeoutError:
            raise
        except Exception as error:
            raise self._error(error) from None
        yield usage


def attempt_timeout(deadline: Deadline, call_cap_s: float) -> float:
    """The next call's timeout; ProviderError (`budget`) when nothing of the deadline remains."""
    timeout_s = deadline.call_timeout(call_cap_s)
    if timeout_s <= 0:
        raise ProviderError("the answer budget ran out", reason="budget")
    return timeout_s


def overrun(timeout_s: float, call_cap_s: float) -> ProviderError:
    """The error for a call that ran out of its `timeout_s`."""
    return ProviderError(f"no answer within {timeout_s:.2f} s",
                         reason=Deadline.overrun_reason(timeout_s, call_cap_s))


async def wait_to_retry(error: ProviderError, attempt: int, deadline: Deadline, policy: RetryPolicy,
                        rng: random.Random) -> None:
    """Sleep before call `attempt + 1`, or raise: `error` itself when it is not retryable or the
    attempts are spent, ProviderError (`budget`) when the wait would end after the deadline."""
    if not error.retryable or attempt >= policy.attempts:
        raise error
    wait = policy.delay(attempt, error.retry_after_s, rng)
    if wait >= deadline.remaining():
        raise ProviderError(f"{error}; no time left to retry after {wait:.2f} s",
                            reason="budget", status=error.status) from None
    await asyncio.sleep(wait)


async def with_retries(call: Callable[[float], Awaitable[T]], deadline: Deadline, policy: RetryPolicy,
                       call_cap_s: float, rng: random.Random) -> T:
    """`call(timeout_s)` until it succeeds, retrying 429 and 5xx while the deadline allows.

    Raises ProviderError with reason `budget` when the deadline ends the attempts, `timeout`
    when one call overran its own cap, else the last call's error.
    """
    attempt = 0
    while True:
        attempt += 1
        timeout_s = attempt_timeout(deadline, call_cap_s)
        try:
            return await asyncio.wait_for(call(timeout_s), timeout_s)
        except TimeoutError:
            raise overrun(timeout_s, call_cap_s) from None
        except ProviderError as error:
            await wait_to_retry(error, attempt, deadline, policy, rng)
