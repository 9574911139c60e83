"""Learning while serving, over real HTTP: experiences, feedback, learners, restart of the actor."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pyarrow.parquet as pq
import pytest
import ray

from cluster.actors.start import learning_state
from cluster.clients.train import train_dataset
from cluster.clients.train_plot import plot_learning_curve
from cluster.clients.train_report import format_report, report_json
from cluster.data.corpus import sample_corpus_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def service(live_settings, deployed):
    settings = dataclasses.replace(
        live_settings,
        features=live_settings.features.with_changes({"experience_replay": True, "soft_q_bandit": True}),
        learning=dataclasses.replace(live_settings.learning, policy_refresh_s=0.2,
                                     core=dataclasses.replace(live_settings.learning.core, min_replay_size=4)),
    )
    async with deployed(settings, "learning-tests") as client:
        yield client


async def search(client: httpx.AsyncClient, q: str = "how do vaccines work", **extra) -> dict:
    response = await client.post("/api/v1/search/", json={"q": q, "final_topk": 5}, **extra)
    assert response.status_code == 200, response.text
    return response.json()


async def test_feedback_becomes_a_reward_once(service):
    served = await search(service)
    top = served["hits"][0]["doc_id"]
    inserted = (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"]
    first = await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                          "judgements": {top: 2, "unseen": 1}})
    assert first.status_code == 200, first.text
    body = first.json()
    # served list [top, ...]: DCG = 2; ideal = 2 + 1/log2(3)
    assert body["reward"] == pytest.approx(2 / (2 + 1 / 1.5849625007), abs=1e-6)
    assert (body["search_id"], body["duplicate"]) == (served["search_id"], False)
    # graded judgements also score what every other strategy would have served: 4 experiences
    rewards = body["strategy_rewards"]
    assert set(rewards) == {"lexical", "dense", "hybrid_rrf", "hybrid_weighted"}
    assert rewards[served["strategy"]] == body["reward"]
    assert all(0.0 <= r <= 1.0 for r in rewards.values())
    assert (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"] == inserted + 4
    again = await service.post("/api/v1/feedback", json={"search_id": served["search_id"], "clicks": []})
    assert again.json() == {**body, "duplicate": True}


async def test_clicks_reward_the_served_strategy_only(service):
    served = await search(service)
    inserted = (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"]
    response = await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                             "clicks": [served["hits"][0]["doc_id"]]})
    assert response.status_code == 200, response.text
    assert response.json()["strategy_rewards"] is None and response.json()["reward"] == 1.0
    assert (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"] == inserted + 1


async def test_feedback_errors(service):
    unknown = await service.post("/api/v1/feedback", json={"search_id": "0" * 32, "clicks": []})
    assert unknown.status_code == 404 and "0" * 32 in unknown.json()["message"]
    served = await search(service)
    for body, field in [
        ({"search_id": served["search_id"], "judgements": {"d1": 7}}, "judgements.d1"),
        ({"search_id": served["search_id"], "judgements": {"d1": "2"}}, "judgements.d1"),
        ({"search_id": served["search_id"], "judgements": {}}, "judgements"),
        ({"search_id": served["search_id"]}, "body"),
        ({"search_id": served["search_id"], "clicks": [], "judgements": {"d1": 1}}, "body"),
        ({"search_id": "not-an-id", "clicks": []}, "search_id"),
        ({"search_id": served["search_id"], "clicks": "d1"}, "clicks"),
    ]:
        response = await service.post("/api/v1/feedback", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in [e["field"] for e in response.json()["errors"]], (body, response.json())


async def test_learners_update_the_policy_and_replicas_follow(service, eventually):
    for _ in range(12):
        served = await search(service, "black holes")
        await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                      "clicks": [served["hits"][0]["doc_id"]]})

    async def learned() -> dict | None:
        """The learning report once the actor applied an update and the driver counted it."""
        learning = (await service.get("/api/v1/admin/learning")).json()
        applied = learning["state"]["updates_applied"] > 0 and learning["learners"]["applied"] > 0
        return learning if applied else None

    learning = await eventually(learned)
    assert learning["learners"]["failed"] == 0
    assert learning["q_table"]["q"], "some state has Q values"
    assert len(learning["q_table"]["pooled"]) == 4
    assert learning["state"]["replay_size"] >= 12


async def test_killed_learning_state_comes_back_and_no_search_fails(service, tmp_path, eventually):
    actor = learning_state()
    for _ in range(6):  # make sure there is something to learn from and to restore
        served = await search(service, "glaciers and climate")
        await service.post("/api/v1/feedback", json={"search_id": served["search_id"], "clicks": []})
    saved_version = await actor.checkpoint.remote()
    saved = await actor.q_table.remote()
    saved_stats = await actor.stats.remote()

    async def searches_during_restart() -> list[int]:
        return [(await service.post("/api/v1/search/", json={"q": f"rivers {i}"})).status_code
                for i in range(30)]

    running = asyncio.create_task(searches_during_restart())
    ray.kill(actor, no_restart=False)
    statuses = await running
    assert statuses == [200] * 30

    async def stats_once_back() -> dict | None:
        try:
            return await learning_state().stats.remote()
        except ray.exceptions.RayError:  # still restarting
            return None

    restored = await eventually(stats_once_back)
    assert restored["restored_from_version"] == saved_version
    assert restored["replay_size"] >= saved_stats["replay_size"]
    q_after = await learning_state().q_table.remote()
    for state, values in saved["q"].items():
        assert state in q_after["q"]
    assert q_after["policy_version"] >= saved_version

    exported = tmp_path / "replay.parquet"
    rows = await learning_state().export_parquet.remote(str(exported))
    table = pq.read_table(exported)
    assert table.num_rows == rows == restored["replay_size"]
    assert {"state_key", "strategy", "reward", "propensity", "priority"} <= set(table.column_names)


async def test_dtrag_train_runs_the_simulated_user_and_scores_every_policy(service, tmp_path):
    """`dtrag train` end to end on the sample corpus: no training qrels, so half its queries train."""
    key = service.headers["X-API-Key"]
    report = await asyncio.to_thread(train_dataset, sample_corpus_dir(), str(service.base_url), key,
                                     epochs=1, concurrency=2)
    train_queries = 20  # of the corpus's 40 judged queries
    assert report.epochs[0].feedbacks == train_queries and report.epochs[0].caught_up
    # graded qrels reward all four strategies per feedback
    added = report.epochs[0].learning["inserted"] - report.started_from["inserted"]
    assert added == 4 * train_queries
    scores = report.scores
    assert set(scores.fixed) == {"lexical", "dense", "hybrid_rrf", "hybrid_weighted"}
    assert all(0.0 <= v <= 1.0 for v in [*scores.fixed.values(), scores.greedy, scores.served])
    assert scores.oracle >= max(scores.fixed.values()) - 1e-12  # one action per state includes every fixed one
    assert scores.greedy <= scores.oracle + 1e-12
    assert report.curve()[0][0] == 0 and report.curve()[-1][0] == train_queries
    assert "oracle - learned (greedy)" in format_report(report)
    assert report_json(report)["scores"]["greedy"] == scores.greedy
    plot_learning_curve(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")
