"""Learning while serving, over real HTTP: experiences, feedback, learners, restart of the actor."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from cluster.actors.start import learning_state
from cluster.clients.train import train_dataset
from cluster.clients.train_plot import plot_cost_quality
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


ACTIONS = ["lexical", "hybrid@0.3", "hybrid@0.3+prf", "hybrid@0.5", "hybrid@0.5+prf", "hybrid@0.7",
           "hybrid@0.7+prf"]


async def test_feedback_becomes_a_reward_once(service, live_settings):
    served = await search(service)
    assert served["strategy"] == "hybrid@0.5"  # a fresh model serves the default action
    top = served["hits"][0]["doc_id"]
    inserted = (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"]
    first = await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                          "judgements": {top: 2, "unseen": 1}})
    assert first.status_code == 200, first.text
    body = first.json()
    # served list [top, ...]: DCG = 2; ideal = 2 + 1/log2(3)
    assert body["reward"] == pytest.approx(2 / (2 + 1 / 1.5849625007), abs=1e-6)
    assert (body["search_id"], body["duplicate"]) == (served["search_id"], False)
    # graded judgements also score every other action, those the search skipped (PRF) run now
    quality, rewards = body["action_quality"], body["action_rewards"]
    assert list(quality) == list(rewards) == ACTIONS
    assert quality[served["strategy"]] == body["reward"] and body["cost_cpu_ms"] > 0
    weight = live_settings.learning.core.cost_weight
    assert rewards[served["strategy"]] == pytest.approx(body["reward"] - weight * body["cost_cpu_ms"])
    assert rewards["lexical"] == quality["lexical"]  # nothing after the lexical stage: no cost
    assert all(rewards[a] < quality[a] for a in ACTIONS if a != "lexical")
    assert all(0.0 <= q <= 1.0 for q in quality.values())
    assert (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"] == inserted + len(ACTIONS)
    again = await service.post("/api/v1/feedback", json={"search_id": served["search_id"], "clicks": []})
    assert again.json() == {**body, "duplicate": True}


async def test_clicks_reward_the_served_action_only(service):
    served = await search(service)
    inserted = (await service.get("/api/v1/admin/learning")).json()["state"]["inserted"]
    response = await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                             "clicks": [served["hits"][0]["doc_id"]]})
    assert response.status_code == 200, response.text
    assert response.json()["action_rewards"] is None and response.json()["reward"] == 1.0
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


async def test_learners_fit_the_model_and_the_admin_view_shows_it(service, live_settings, eventually):
    for query in ("black holes", "photosynthesis", "vaccines and immunity", "ocean tides"):
        served = await search(service, query)
        await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                      "judgements": {served["hits"][0]["doc_id"]: 1}})

    async def learned() -> dict | None:
        """The learning report once the actor applied an update and the driver counted it."""
        learning = (await service.get("/api/v1/admin/learning")).json()
        applied = learning["state"]["updates_applied"] > 0 and learning["learners"]["applied"] > 0
        return learning if applied else None

    learning = await eventually(learned)
    assert learning["learners"]["failed"] == 0
    model = learning["model"]
    assert model["actions"] == ACTIONS and model["default_action"] == "hybrid@0.5"
    assert any(v != 0 for row in model["theta"].values() for v in row.values()), "the model has parameters"
    assert set(model["theta"]["lexical"]) == {"intercept", *model["features"]}
    assert min(model["experiences_per_action"].values()) >= 4
    # mostly graded feedback, which rewards every action: far less exploration than with clicks alone
    assert 0 <= model["exploration_rate"] < live_settings.learning.core.explore_max / 2
    sample = model["sample"]
    assert set(sample["values"]) == set(ACTIONS) and sum(sample["probabilities"].values()) == pytest.approx(1)
    averages = learning["graded_averages"]
    # lexical pays only to backfill a short list from dense; every hybrid embeds the query
    assert averages["lexical"]["cost_cpu_ms"] < averages["hybrid@0.5"]["cost_cpu_ms"]
    assert averages["lexical"]["searches"] == averages["hybrid@0.5+prf"]["searches"] >= 4
    assert learning["cost_weight"] > 0


async def test_killed_learning_state_comes_back_and_no_search_fails(service, tmp_path, eventually):
    actor = learning_state()
    for _ in range(6):  # make sure there is something to learn from and to restore
        served = await search(service, "glaciers and climate")
        await service.post("/api/v1/feedback", json={"search_id": served["search_id"], "clicks": []})
    saved_version = await actor.checkpoint.remote()
    saved = (await actor.model.remote())["retrieval"]
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
            stats = await learning_state().stats.remote()
        except ray.exceptions.RayError:  # still restarting
            return None
        return stats if stats["loaded"] else None  # it loads from the database after it starts

    restored = await eventually(stats_once_back)
    assert restored["restored_from_version"] == saved_version
    assert restored["replay_size"] >= saved_stats["replay_size"]
    after = (await learning_state().model.remote())["retrieval"]
    assert restored["policy_version"] >= saved_version
    assert after["experiences_per_action"] == saved["experiences_per_action"]

    exported = tmp_path / "replay.parquet"
    rows = await learning_state().export_parquet.remote(str(exported))
    table = pq.read_table(exported)
    assert table.num_rows == rows == restored["replay_size"]
    assert {"context", "strategy", "reward", "propensity", "priority"} <= set(table.column_names)


async def test_dtrag_train_resets_trains_and_scores_every_policy_per_seed(service, tmp_path):
    """`dtrag train` end to end on the sample corpus: no training qrels, so half its queries train."""
    key = service.headers["X-API-Key"]
    report = await asyncio.to_thread(train_dataset, sample_corpus_dir(), str(service.base_url), key,
                                     seeds=[0, 1], judged=20, concurrency=2)
    assert [run.seed for run in report.runs] == [0, 1] and report.actions == ACTIONS
    for run in report.runs:
        assert sum(run.snapshots[0].policy.seen) == 0  # each seed starts from a fresh model
        assert run.snapshots[-1].judged == len(run.train_quality) >= 20 and not run.skipped
        assert [s.judged for s in run.snapshots[:2]] == [0, 10]  # the curve: every 10 judged queries
        assert len(run.test.query_ids) == 20 and run.test.quality.shape == (20, len(ACTIONS))
        # lexical costs nothing unless it backfills a short list from dense; every hybrid embeds
        assert np.median(run.test.cost[:, 0]) == 0 and (run.test.cost[:, 1:] > 0).all()
    text = format_report(report)
    assert "learned, as served" in text and "strict gain" in text
    record = json.loads(json.dumps(report_json(report)))  # plain JSON all the way down
    assert record["judged"] == report.final_judged and len(record["seeds"]) == 2
    first = report.runs[0].test
    assert record["seeds"][0]["test"][first.query_ids[0]]["context"] == first.contexts[0].tolist()
    plot_cost_quality(report, tmp_path / "cost_quality.png")
    assert (tmp_path / "cost_quality.png").read_bytes().startswith(b"\x89PNG")
