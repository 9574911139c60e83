"""The real google-genai and openai SDKs against local servers that speak their protocols."""

import random
import time

import pytest

from serve_app.answers.deadline import Deadline, RetryPolicy
from serve_app.answers.providers import GeminiProvider, OpenAIProvider, ProviderError, Usage, with_retries

KEY = "sk-test-7f3a9c2e55d1b0aa"
RETRY = RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=0.2)


@pytest.fixture(params=["gemini", "openai"])
def provider(request, server):
    if request.param == "gemini":
        return GeminiProvider(KEY, "gemini-flash-latest", base_url=server.gemini_base_url)
    return OpenAIProvider(server.openai_base_url, "local-model", api_key=KEY)


async def call(provider, deadline_s=5.0, cap_s=5.0):
    return await with_retries(lambda timeout_s: provider.generate("Be brief.", "Question?", 64, timeout_s),
                              Deadline.after(deadline_s), RETRY, cap_s, random.Random(0))


async def test_generate_returns_text_and_token_counts_and_sends_the_key(provider, server):
    generation = await call(provider)
    assert generation.text.startswith("The passages answer it [1]") and not generation.refused
    assert generation.usage == Usage(120, 30)
    assert [c.api_key for c in server.calls] == [KEY]
    assert KEY not in repr(provider)


async def test_429_is_retried_after_the_servers_retry_after(provider, server):
    server.reset(fail_first=1, status=429, retry_after="0.3")
    started = time.monotonic()
    generation = await call(provider)
    assert generation.usage.output_tokens == 30 and len(server.calls) == 2
    assert server.calls[1].at - server.calls[0].at >= 0.3 and time.monotonic() - started < 3


async def test_500_is_retried_until_the_attempts_run_out(provider, server):
    server.reset(fail_first=5, status=500)
    with pytest.raises(ProviderError) as failure:
        await call(provider)
    assert failure.value.status == 500 and failure.value.reason == "provider_error"
    assert len(server.calls) == RETRY.attempts and KEY not in str(failure.value)


async def test_a_retry_that_would_end_after_the_deadline_is_not_made(provider, server):
    server.reset(fail_first=1, status=429, retry_after="5")
    with pytest.raises(ProviderError) as failure:
        await call(provider, deadline_s=1.0)
    assert failure.value.reason == "budget" and len(server.calls) == 1


async def test_malformed_bodies_are_a_provider_error_not_a_crash(provider, server):
    server.reset(malformed=True)
    with pytest.raises(ProviderError) as failure:
        await call(provider)
    assert failure.value.reason == "provider_error" and len(server.calls) == 1  # a 200: not retried


async def test_a_hanging_server_times_out_at_the_call_cap_or_the_deadline(provider, server):
    server.reset(hang=True)
    started = time.monotonic()
    with pytest.raises(ProviderError) as capped:
        await call(provider, deadline_s=5.0, cap_s=0.3)
    assert capped.value.reason == "timeout" and time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(ProviderError) as out_of_budget:
        await call(provider, deadline_s=0.4, cap_s=5.0)
    assert out_of_budget.value.reason == "budget" and time.monotonic() - started < 1.5


async def test_streams_arrive_in_pieces_then_the_usage(provider, server):
    server.reset(chunks=4)
    pieces = [piece async for piece in provider.stream("Be brief.", "Question?", 64, 5.0)]
    text = [p for p in pieces if isinstance(p, str)]
    assert len(text) >= 2 and "".join(text).startswith("The passages answer it [1]")
    assert pieces[-1] == Usage(120, 30)
