"""Answers over real HTTP through Ray Serve, with the real google-genai client and a local Gemini server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

GEMINI_KEY = "AIzaLocalTestKey-6b1d0e4f93a2c7"
BUDGET_S = 30.0  # ample, so a busy machine never turns these answers into budget fallbacks


@pytest.fixture(scope="module")
async def service(live_settings, deployed, model_server):
    settings = model_server.answering(
        dataclasses.replace(live_settings, features=live_settings.features.with_changes({"experience_replay": True})),
        GEMINI_KEY, BUDGET_S, backoff_s=0.05, max_backoff_s=0.1)
    async with deployed(settings, "answers-tests") as client:
        yield client


async def search(client: httpx.AsyncClient, **body) -> dict:
    response = await client.post("/api/v1/search/", json={"q": "how do vaccines train the immune system?", **body})
    assert response.status_code == 200, response.text
    return response.json()


async def test_generated_answers_cite_only_retrieved_documents(service, server):
    server.reset(text="Vaccines teach immunity [1], boosters renew it [2]; unrelated [9].")
    for _ in range(200):
        body = await search(service, final_topk=5)
        answer, hits = body["answer"], {hit["doc_id"] for hit in body["hits"]}
        assert (answer["mode"], answer["provider"], answer["fallback"]) == ("generated", "gemini", None)
        assert answer["citations"] and set(answer["citations"]) <= hits
        assert all(f"[{doc_id}]" in answer["text"] for doc_id in answer["citations"])
        assert answer["dropped_citations"] == 1 and "[9]" not in answer["text"]
    assert answer["usage"] == {"input_tokens": 120, "output_tokens": 30}
    assert answer["model"] == "gemini-flash-latest"
    assert {call.api_key for call in server.calls} == {GEMINI_KEY}


@pytest.mark.parametrize(("behaviour", "reason"), [
    ({"fail_first": 100, "status": 500}, "provider_error"),
    ({"malformed": True}, "provider_error"),
    ({"fail_first": 100, "status": 429, "retry_after": "0.05"}, "provider_error"),
])
async def test_a_failing_provider_never_fails_the_search(service, server, behaviour, reason):
    server.reset(**behaviour)
    for mode in ("generated", "debate"):
        body = await search(service, answer_mode=mode)
        assert body["answer"]["fallback"] == reason and body["answer"]["citations"], body["answer"]


async def test_debate_returns_both_drafts_with_debug(service, server):
    server.reset(text="On balance [1]; still, [2] qualifies it.")
    answer = (await search(service, answer_mode="debate", debug=True))["answer"]
    assert (answer["mode"], answer["fallback"]) == ("debate", None)
    assert {d["stance"] for d in answer["drafts"]} == {"supporting", "critical"}
    assert answer["usage"]["input_tokens"] == 3 * 120
    assert (await search(service, answer_mode="debate"))["answer"]["drafts"] is None


async def read_events(response: httpx.Response, stop_after: str | None = None) -> list[tuple[str, dict]]:
    events, name = [], None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            if name == stop_after:
                break
    return events


async def test_a_streamed_search_sends_hits_then_text_then_the_answer(service, server):
    server.reset(text="Vaccines expose the body to antigens [1] and memory cells remain [2].", chunks=5,
                 delay_s=0.3)
    async with service.stream("POST", "/api/v1/search/", json={"q": "vaccines", "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_events(response)
    names = [name for name, _ in events]
    assert names[0] == "hits" and names[-1] == "answer" and set(names[1:-1]) == {"delta"} and len(names) >= 4
    hits, answer = events[0][1], events[-1][1]
    assert hits["search_id"] and hits["hits"] and "answer" not in hits
    assert "".join(data["text"] for name, data in events if name == "delta") == answer["text"]
    assert set(answer["citations"]) <= {hit["doc_id"] for hit in hits["hits"]} and answer["citations"]


async def test_a_client_that_disconnects_cancels_the_provider_call(service, server, eventually):
    server.reset(delay_s=20.0, chunks=20)
    async with service.stream("POST", "/api/v1/search/", json={"q": "vaccines", "stream": True}) as response:
        assert [name for name, _ in await read_events(response, stop_after="hits")] == ["hits"]

        async def called() -> bool:
            return len(server.calls) == 1

        await eventually(called)
    # the client left after the hits; the arm's provider stream must be closed, not run for 20 s

    async def cut() -> bool:
        return server.streams_cut == 1

    await eventually(cut)


async def test_errors_before_the_stream_starts_are_ordinary_json(service):
    response = await service.post("/api/v1/search/", json={"q": "x", "stream": "yes"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "stream"
    response = await service.post("/api/v1/search/", json={"q": "x", "answer_mode": "poem"})
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "answer_mode"


async def test_the_answer_is_rated_once_beside_the_document_feedback(service, server):
    searched = await search(service)
    rated = await service.post("/api/v1/feedback", json={"search_id": searched["search_id"], "answer_rating": True})
    assert rated.status_code == 200, rated.text
    assert (rated.json()["answer_rating"], rated.json()["reward"], rated.json()["duplicate"]) == (1.0, None, False)
    judged = await service.post("/api/v1/feedback", json={"search_id": searched["search_id"], "answer_rating": 1,
                                                           "clicks": [searched["hits"][0]["doc_id"]]})
    assert (judged.json()["answer_rating"], judged.json()["reward"], judged.json()["duplicate"]) == (1.0, 1.0, False)
    again = await service.post("/api/v1/feedback", json={"search_id": searched["search_id"], "answer_rating": 0})
    assert again.json()["duplicate"] is True and again.json()["answer_rating"] == 1.0
    graded = await search(service)
    response = await service.post("/api/v1/feedback", json={"search_id": graded["search_id"], "answer_rating": 3})
    assert response.json()["answer_rating"] == 0.75
    for bad in (5, -1, "yes", 2.5):
        response = await service.post("/api/v1/feedback", json={"search_id": graded["search_id"], "answer_rating": bad})
        assert response.status_code == 422 and "answer_rating" in response.json()["message"], bad


async def test_a_rated_auto_answer_teaches_the_answer_policy_and_a_named_mode_does_not(service, server):
    async def experiences() -> dict[str, float]:
        model = (await service.get("/api/v1/admin/learning")).json()["answer_model"]
        assert model["actions"] == ["extractive", "generated", "debate"]
        return model["experiences_per_action"]

    server.reset(text="Vaccines teach immunity [1].")
    before = await experiences()
    auto = await search(service)  # auto, bandit off: the rule's mode (generated: a provider, no debate flag)
    assert auto["answer"]["mode"] == "generated"
    await service.post("/api/v1/feedback", json={"search_id": auto["search_id"], "answer_rating": True})
    after = await experiences()
    assert after == {**before, "generated": before["generated"] + 1}
    named = await search(service, answer_mode="extractive")
    await service.post("/api/v1/feedback", json={"search_id": named["search_id"], "answer_rating": False})
    assert await experiences() == after


async def test_the_provider_key_appears_in_no_log_and_no_response(service, server):
    import ray

    health = await service.get("/health")
    assert GEMINI_KEY not in health.text
    server.reset(fail_first=100, status=500)
    assert GEMINI_KEY not in (await service.post("/api/v1/search/", json={"q": "x"})).text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [path.name for path in logs.rglob("*") if path.is_file() and GEMINI_KEY.encode() in path.read_bytes()]
    assert not leaked, leaked


async def test_answer_metrics_are_exported(service, server, live_settings, eventually):
    from prometheus_client.parser import text_string_to_metric_families

    server.reset(text="Cited [1] and invented [8].")
    await search(service, answer_mode="generated")
    server.reset(fail_first=100, status=500)
    await search(service, answer_mode="generated")
    wanted = {"ray_answer_latency_seconds", "ray_answer_tokens", "ray_answer_fallbacks",
              "ray_answer_dropped_citations"}
    url = f"http://127.0.0.1:{live_settings.ray.metrics_port}/metrics"
    async with httpx.AsyncClient(timeout=10) as scraper:
        async def exported() -> bool:
            text = (await scraper.get(url)).text
            return wanted <= {family.name for family in text_string_to_metric_families(text)}

        await eventually(exported, timeout_s=60, interval_s=2)
