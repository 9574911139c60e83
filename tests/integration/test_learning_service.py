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
from cluster.cli.main import main as dtrag
from cluster.data.corpus import sample_corpus_dir
from cluster.platform.embedded import server_stopped
from cluster.jobs import ope as ope_job
from cluster.jobs import train as train_job
from cluster.jobs.common import parser as job_parser
from cluster.jobs.export import export
from learners.candidate import decode, encode, fit
from learners.context import FEATURES
from learners.off_policy import LoggedSearches, cross_fitted_rewards, evaluate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def service(live_settings, deployed):
    settings = dataclasses.replace(
        live_settings,
        features=live_settings.features.with_changes({"experience_replay": True, "soft_q_bandit": True}),
        learning=dataclasses.replace(live_settings.learning, policy_refresh_s=0.2,
                                     core=dataclasses.replace(live_settings.learning.core, min_replay_size=4)),
        # The judging rule is unit-tested (tests/unit/test_candidate.py); here a candidate fitted on the
        # few dozen searches this module logs is judged, then promoted whatever the estimate says.
        promotion=dataclasses.replace(live_settings.promotion, min_rows=20, margin=1.0),
    )
    async with deployed(settings, "learning-tests") as client:
        yield client


def job_arguments(name: str, job, argv: list[str]):
    return job_parser(name, None, job.add_arguments).parse_args(argv)


async def search(client: httpx.AsyncClient, q: str = "how do vaccines work", **extra) -> dict:
    response = await client.post("/api/v1/search/", json={"q": q, "final_topk": 5}, **extra)
    assert response.status_code == 200, response.text
    return response.json()


ACTIONS = ["lexical", "hybrid@0.3", "hybrid@0.3+prf", "hybrid@0.5", "hybrid@0.5+prf", "hybrid@0.7",
           "hybrid@0.7+prf"]


async def test_feedback_becomes_a_reward_once(service, live_settings):
    served = await search(service)
    # A fresh model serves the default action except when it explores (explore_max of searches):
    # the unit tests pin that choice; what follows holds for whichever action was served.
    strategy = served["strategy"]
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
    assert quality[strategy] == body["reward"]
    assert (body["cost_cpu_ms"] > 0) == (strategy != "lexical")  # lexical runs nothing after the lexical stage
    weight = live_settings.learning.core.cost_weight
    assert rewards[strategy] == pytest.approx(body["reward"] - weight * body["cost_cpu_ms"])
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
    steps = model["context_bins"]["bins"]  # an intercept, then a step per feature and tercile edge
    assert list(model["theta"]["lexical"]) == ["intercept", *(f"{name}>q{b}" for name in model["features"]
                                                              for b in range(1, steps))]
    assert model["context_bins"]["edges"] is None  # four queries: too few to place the edges
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


@pytest.fixture(scope="module")
async def trained(service):
    """`dtrag train` on the sample corpus: no training qrels, so half its queries train."""
    return await asyncio.to_thread(train_dataset, sample_corpus_dir(), str(service.base_url),
                                   service.headers["X-API-Key"], seeds=[0, 1], judged=20, concurrency=2)


async def test_dtrag_train_resets_trains_and_scores_every_policy_per_seed(trained, tmp_path):
    report = trained
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


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_off_policy_estimates_cover_a_policy_run_on_the_qrels_simulator(trained, seed):
    """Traffic drawn from the sample corpus's test queries, each action rewarded by the nDCG@10 its real
    ranking earns under the qrels; logged by a known exploring policy. A different, context-dependent
    policy's value is known exactly on that simulator; each estimate's interval must hold it."""
    table = trained.runs[0].test  # (queries, actions) nDCG@10 and each query's context
    rng = np.random.default_rng(seed)
    n_actions, default = len(ACTIONS), ACTIONS.index("hybrid@0.5")
    behaviour = np.full(n_actions, 0.5 / n_actions)
    behaviour[default] += 0.5
    queries = rng.integers(0, len(table.query_ids), 3000)
    actions = rng.choice(n_actions, size=len(queries), p=behaviour)
    logs = LoggedSearches.usable(table.contexts[queries], actions, behaviour[actions], table.quality[queries, actions])
    gap = table.contexts[:, FEATURES.index("top_gap")]
    target = np.eye(n_actions)[np.where(gap > np.median(gap), ACTIONS.index("lexical"), ACTIONS.index("hybrid@0.7"))]
    truth = float((target * table.quality).sum(axis=1).mean())
    estimates = evaluate(logs, target[queries], cross_fitted_rewards(logs, n_actions), seed=seed)
    for estimate in estimates.values():
        assert estimate.low <= truth <= estimate.high, (estimate, truth)


async def test_export_train_ope_then_promote_and_roll_back(service, trained, live_settings, tmp_path, capsys,
                                                           eventually):
    """After `dtrag train` logged rewarded searches: export them, fit a candidate on them offline, judge it
    off-policy, promote it (judged again by the service), see it served, roll it back."""
    await export(live_settings.database.url, tmp_path / "export", None, None)
    learning = live_settings.learning
    trained_job = train_job.run(job_arguments("train", train_job, [str(tmp_path / "export"), "--name", "from-the-logs",
                                                                   "--out", str(tmp_path / "candidate.policy")]),
                                live_settings)
    assert trained_job["searches"] >= 20 and trained_job["path"] == str(tmp_path / "candidate.policy")
    path = tmp_path / "candidate.policy"
    candidate = decode(path.read_bytes())
    assert candidate.trained_on["searches"] == trained_job["searches"]
    judged = ope_job.run(job_arguments("ope", ope_job, [str(tmp_path / "export"), "--candidate", str(path),
                                                        "--fixed", "lexical", "--out", str(tmp_path / "ope")]),
                         live_settings)
    assert set(judged["estimates"]) == {"logged policy", "from-the-logs", "always lexical"}
    assert set(judged["estimates"]["from-the-logs"]) == {"ips", "snips", "dr"}
    assert (tmp_path / "ope" / "estimates.parquet").exists() and "| from-the-logs | dr |" in (
        tmp_path / "ope" / "table.md").read_text()
    target = ["--url", str(service.base_url).rstrip("/"), "--api-key", service.headers["X-API-Key"]]
    key_id = service.headers["X-API-Key"].split("_")[1]
    replaced = (await service.get("/api/v1/admin/learning")).json()["model"]

    async def served_version(version: int) -> bool:
        return (await search(service))["policy_version"] == version

    assert await asyncio.to_thread(dtrag, ["policy", "promote", str(path), *target]) == 0
    assert "promoted candidate 'from-the-logs'" in (shown := capsys.readouterr().out) and "judged on" in shown
    promoted = (await service.get("/api/v1/admin/policy/history", params={"limit": 1})).json()[0]
    assert (promoted["change"], promoted["candidate"], promoted["key_id"]) == ("promote", "from-the-logs", key_id)
    assert promoted["judgement"]["rows"] >= 20 and promoted["undone_by"] is None
    assert promoted["policy_version"] > promoted["previous_version"]
    await eventually(lambda: served_version(promoted["policy_version"]))
    model = (await service.get("/api/v1/admin/learning")).json()["model"]
    expected = candidate.value_model(learning.core, ACTIONS.index("hybrid@0.5")).snapshot().pooled
    assert list(model["pooled"].values()) == pytest.approx(expected.tolist())

    assert await asyncio.to_thread(dtrag, ["policy", "rollback", *target]) == 0
    assert "rolled back the promotion of 'from-the-logs'" in capsys.readouterr().out
    rollback, undone = (await service.get("/api/v1/admin/policy/history", params={"limit": 2})).json()
    assert (rollback["change"], undone["id"], undone["undone_by"]) == ("rollback", promoted["id"], rollback["id"])
    assert rollback["policy_version"] > promoted["policy_version"]
    await eventually(lambda: served_version(rollback["policy_version"]))
    restored = (await service.get("/api/v1/admin/learning")).json()["model"]
    assert restored["pooled"] == pytest.approx(replaced["pooled"]) and restored["gates"] == replaced["gates"]

    assert await asyncio.to_thread(dtrag, ["policy", "rollback", *target]) == 1
    assert "no promotion to roll back" in capsys.readouterr().err
    with server_stopped(live_settings.state_dir):  # a change that cannot be audited is not made
        refused = await service.post("/api/v1/admin/policy/promote", params={"force": "true"},
                                     content=path.read_bytes())
    assert refused.status_code == 503 and "database unavailable" in refused.json()["message"], refused.text
    assert refused.headers["retry-after"] and "Traceback" not in refused.text

    async def latest_change() -> dict | None:  # the ingress's pool reconnects once the server is back
        response = await service.get("/api/v1/admin/policy/history", params={"limit": 1})
        return response.json()[0] if response.status_code == 200 else None

    assert (await eventually(latest_change))["id"] == rollback["id"]
    assert await asyncio.to_thread(dtrag, ["policy", "history", *target]) == 0
    assert "from-the-logs" in capsys.readouterr().out


async def test_a_candidate_that_does_not_fit_is_refused_and_changes_nothing(service, live_settings):
    before = (await service.get("/api/v1/admin/learning")).json()["state"]["policy_version"]
    promote = "/api/v1/admin/policy/promote"
    for body, status, words in [
        (b"not a policy file", 422, "not a candidate policy file"),
        (encode(fit("two-actions", "retrieval", [], ACTIONS[:2], FEATURES, 0, live_settings.learning.core, 32)), 422,
         "refit it on logs exported from this service"),
    ]:
        response = await service.post(promote, content=body)
        assert response.status_code == status and words in response.json()["message"], response.text
    keyless = await service.post(promote, content=b"x" * 100, headers={"X-API-Key": ""})
    assert keyless.status_code == 401 and keyless.json()["error"] == "unauthorized"
    too_large = await service.post(promote, content=b"x" * (9 * 1024 * 1024))
    assert too_large.status_code == 413 and "8388608" in too_large.json()["message"]
    assert (await service.get("/api/v1/admin/learning")).json()["state"]["policy_version"] == before
