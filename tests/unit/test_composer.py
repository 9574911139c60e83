"""Answer composition with the real OpenAI client against a local server: modes, fallbacks, the budget."""

import time

import pytest

from serve_app.answers.composer import AnswerComposer, AnswerLimits
from serve_app.answers.deadline import Deadline, RetryPolicy
from serve_app.answers.providers import OpenAIProvider, Usage
from serve_app.retrieval import StoredDocument

DOCS = [StoredDocument("d1", "Tides", "The moon's gravity raises the tides. Tides are not caused by wind."),
        StoredDocument("d2", "Spring tides", "Spring tides follow the full and new moon."),
        StoredDocument("d3", "Waves", "Wind raises waves, however it does not raise tides.")]
LIMITS = AnswerLimits(default_mode="auto", budget_s=5.0, passages=3, max_prompt_chars=4000, max_output_tokens=128,
                      call_timeout_s=5.0, retry=RetryPolicy(attempts=2, base_delay_s=0.05, max_delay_s=0.1))


@pytest.fixture
def composer(server):
    return AnswerComposer(OpenAIProvider(server.openai_base_url, "local-model"), LIMITS, seed=0)


async def test_a_generated_answer_cites_doc_ids_and_drops_invented_passages(composer, server):
    server.reset(text="Gravity [1] and phases [2] matter; see also [7].")
    answer = await composer.compose("why tides?", DOCS, "generated", Deadline.after(5))
    assert answer.text == "Gravity [d1] and phases [d2] matter; see also."
    assert (answer.citations, answer.dropped_citations, answer.fallback) == (["d1", "d2"], 1, None)
    assert (answer.mode, answer.provider, answer.model, answer.usage) == ("generated", "openai", "local-model",
                                                                         Usage(120, 30))
    prompt = server.calls[0].body["messages"][1]["content"]
    assert "[1] Tides." in prompt and "[3] Waves." in prompt


@pytest.mark.parametrize(("behaviour", "reason"), [
    ({"fail_first": 5, "status": 500}, "provider_error"),
    ({"malformed": True}, "provider_error"),
    ({"text": "   "}, "refused"),
])
async def test_a_failing_provider_still_gives_an_extractive_answer_and_says_why(composer, server, behaviour,
                                                                                 reason):
    server.reset(**behaviour)
    answer = await composer.compose("why tides?", DOCS, "generated", Deadline.after(5))
    assert (answer.mode, answer.fallback, answer.provider) == ("extractive", reason, None)
    assert answer.citations and answer.text


async def test_debate_drafts_concurrently_then_synthesises(composer, server):
    delay = 0.3
    server.reset(delay_s=delay, text="On balance [1], though [3] qualifies it.")
    started = time.monotonic()
    answer = await composer.compose("why tides?", DOCS, "debate", Deadline.after(5), debug=True)
    elapsed = time.monotonic() - started
    assert answer.mode == "debate" and answer.fallback is None and answer.citations == ["d1", "d3"]
    assert elapsed >= 2 * delay  # drafts, then the synthesis
    first, second, synthesis = server.calls
    # Two rounds, not three: the second draft was asked for before the first answered (each takes
    # `delay`), and the synthesis only after both. Start times, not a wall-clock bound, which a
    # busy machine stretches.
    assert abs(first.at - second.at) < delay and synthesis.at - max(first.at, second.at) >= delay
    assert {d.stance for d in answer.drafts} == {"supporting", "critical"}
    assert answer.usage == Usage(360, 90)
    assert "Drafts:" in synthesis.body["messages"][1]["content"]


async def test_a_late_synthesis_is_cancelled_and_the_best_draft_stands_in(composer, server):
    server.reset(delay_by_call=(0.1, 0.1, 5.0))
    started = time.monotonic()
    answer = await composer.compose("why tides?", DOCS, "debate", Deadline.after(1.0))
    assert time.monotonic() - started < 1.1
    assert (answer.mode, answer.fallback) == ("debate", "budget") and answer.citations


async def test_when_no_draft_finishes_in_the_budget_the_answer_is_extractive(composer, server):
    server.reset(delay_s=2.0)
    started = time.monotonic()
    answer = await composer.compose("why tides?", DOCS, "debate", Deadline.after(1.0))
    assert time.monotonic() - started < 1.1
    assert (answer.mode, answer.fallback) == ("extractive", "budget") and answer.citations


async def test_without_a_provider_generated_falls_back_and_debate_runs_offline():
    offline = AnswerComposer(None, LIMITS)
    assert offline.resolve(None, debate_flag=False) == "extractive"
    assert offline.resolve("auto", debate_flag=True) == "debate"
    generated = await offline.compose("why tides?", DOCS, "generated", Deadline.after(5))
    assert (generated.mode, generated.fallback) == ("extractive", "no_provider")
    debate = await offline.compose("are tides caused by wind?", DOCS, "debate", Deadline.after(5), debug=True)
    assert (debate.mode, debate.fallback, debate.provider) == ("debate", "no_provider", None)
    critical = next(d for d in debate.drafts if d.stance == "critical")
    assert "not" in critical.text and set(debate.citations) >= set(critical.citations)
    assert (await offline.compose("x", DOCS, "debate", Deadline.after(5))).drafts is None  # only with debug


async def test_a_stream_shows_text_as_it_arrives_then_the_cited_answer(composer, server):
    server.reset(text="Gravity raises tides [1] and phases matter [2].", chunks=5, delay_s=0.2)
    pieces = [p async for p in composer.stream("why tides?", DOCS, "generated", Deadline.after(5))]
    *deltas, answer = pieces
    assert len(deltas) >= 3 and "".join(deltas) == answer.text
    assert answer.text == "Gravity raises tides [d1] and phases matter [d2]."
    assert answer.citations == ["d1", "d2"] and answer.usage == Usage(120, 30)
