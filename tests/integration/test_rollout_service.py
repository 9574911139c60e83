"""A/B rollout over real HTTP: sticky weighted arms, live flags, the guard, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_app.router import choose_arm

FAST_GUARD = """
guard: {check_interval_s: 0.5, window_s: 30, failures_to_rollback: 3, min_requests: 10, min_rewards: 1000}
"""


@pytest.fixture(scope="module")
async def service(live_settings, deployed, tmp_path_factory):
    shipped = Path(__file__).parents[2].joinpath("configs/rollout.yaml").read_text()
    plan = tmp_path_factory.mktemp("rollout") / "rollout.yaml"
    plan.write_text(shipped.split("guard:")[0] + FAST_GUARD + "stages:" + shipped.split("stages:")[1])
    settings = dataclasses.replace(
        live_settings,
        rollout=dataclasses.replace(live_settings.rollout, plan=str(plan)),
        learning=dataclasses.replace(live_settings.learning, min_replay_size=4),
    )
    async with deployed(settings, "rollout-tests") as client:
        yield client


async def arms_of(client: httpx.AsyncClient, users: list[str]) -> dict[str, str]:
    semaphore = asyncio.Semaphore(8)

    async def one(user: str) -> tuple[str, str]:
        async with semaphore:
            response = await client.post("/api/v1/search/", json={"q": "ocean tides", "final_topk": 1},
                                         headers={"X-User-Id": user})
        assert response.status_code == 200, response.text
        return user, response.json()["arm"]

    return dict(await asyncio.gather(*(one(u) for u in users)))


async def set_weight(client: httpx.AsyncClient, weight: float) -> None:
    response = await client.put("/api/v1/admin/rollout/weight", json={"treatment_weight": weight})
    assert response.status_code == 200, response.text
    await asyncio.sleep(1.0)  # replicas refresh every 0.25 s


async def test_flags_show_and_set(service):
    shown = (await service.get("/api/v1/admin/flags")).json()
    assert set(shown["arms"]) == {"control", "treatment"}
    assert shown["behaviour"]["debate_mode"] == "no behaviour yet"
    assert "soft-Q" in shown["behaviour"]["soft_q_bandit"]
    changed = await service.put("/api/v1/admin/flags", json={"arm": "treatment", "flags": {"debate_mode": True}})
    assert changed.status_code == 200 and changed.json()["arms"]["treatment"]["debate_mode"] is True
    assert changed.json()["arms"]["control"]["debate_mode"] is False
    for body, field in [({"arm": "treatment", "flags": {"warp_drive": True}}, "flags.warp_drive"),
                        ({"arm": "canary", "flags": {"debate_mode": True}}, "arm"),
                        ({"arm": "treatment", "flags": {"debate_mode": "on"}}, "flags.debate_mode")]:
        response = await service.put("/api/v1/admin/flags", json=body)
        assert response.status_code == 422 and field in response.json()["message"], response.text
    assert (await service.put("/api/v1/admin/rollout/weight", json={"treatment_weight": 1.5})).status_code == 422


async def test_assignment_is_sticky_and_follows_the_router(service):
    users = [f"user-{i}" for i in range(300)]
    await set_weight(service, 0.1)
    at_10 = await arms_of(service, users)
    assert at_10 == {u: choose_arm(u, {"treatment": 0.1}) for u in users}
    assert 10 <= sum(a == "treatment" for a in at_10.values()) <= 50
    await set_weight(service, 0.5)
    at_50 = await arms_of(service, users)
    assert {u for u, a in at_10.items() if a == "treatment"} <= {u for u, a in at_50.items() if a == "treatment"}
    assert at_50 == {u: choose_arm(u, {"treatment": 0.5}) for u in users}
    await set_weight(service, 0.0)


async def test_stages_advance_and_rollback_by_hand(service):
    status = (await service.get("/api/v1/admin/rollout")).json()
    assert status["stage"] == "baseline" and status["stages"][0] == "baseline"
    advanced = (await service.post("/api/v1/admin/rollout/advance")).json()
    assert advanced["stage"] == "replay_10" and advanced["treatment_weight"] == 0.1
    assert advanced["flags"]["treatment"]["experience_replay"] is True
    rolled = (await service.post("/api/v1/admin/rollout/rollback", json={"reason": "drill"})).json()
    assert rolled["treatment_weight"] == 0.0 and rolled["rolled_back"] == "drill"
    assert "drill" in rolled["events"][-1]["event"]


async def test_status_reports_each_arm_and_the_reward_difference(service):
    # Before the guard test: its failed requests stay in the guard's window (30 s here) and would
    # roll this test's 50% treatment back before both arms collect rewards.
    await service.put("/api/v1/admin/flags", json={"arm": "control", "flags": {"experience_replay": True}})
    await service.put("/api/v1/admin/flags", json={"arm": "treatment", "flags": {"experience_replay": True}})
    await set_weight(service, 0.5)
    for i in range(40):
        served = (await service.post("/api/v1/search/", json={"q": "rainforest", "final_topk": 3},
                                     headers={"X-User-Id": f"reward-{i}"})).json()
        await service.post("/api/v1/feedback", json={"search_id": served["search_id"],
                                                      "clicks": [served["hits"][0]["doc_id"]]})
    status = (await service.get("/api/v1/admin/rollout")).json()
    for arm in ("control", "treatment"):
        summary = status["arms"][arm]
        assert summary["requests"] > 0 and summary["p50_ms"] > 0 and summary["p95_ms"] >= summary["p50_ms"]
        assert summary["rewards"] > 0 and summary["mean_reward"] is not None
    assert set(status["reward_difference"]) == {"delta", "ci95", "p_value", "significant"}
    await set_weight(service, 0.0)


async def test_failing_treatment_is_rolled_back_by_the_guard(service):
    await set_weight(service, 0.5)
    assert (await service.put("/api/v1/admin/faults", json={"arm": "treatment", "failing": True})).status_code == 200
    await asyncio.sleep(1.0)
    users = [f"fault-{i}" for i in range(80)]
    statuses = []
    deadline = time.monotonic() + 30
    status = {}
    while time.monotonic() < deadline:
        for user in users[:20]:
            response = await service.post("/api/v1/search/", json={"q": "volcanoes", "final_topk": 1},
                                          headers={"X-User-Id": user})
            statuses.append(response.status_code)
        status = (await service.get("/api/v1/admin/rollout")).json()
        if status["treatment_weight"] == 0.0:
            break
        users = users[20:] + users[:20]
    assert 500 in statuses, "the fault switch made treatment requests fail"
    assert status["treatment_weight"] == 0.0, status
    assert "guard" in status["rolled_back"] and "error rate" in status["rolled_back"]
    assert status["arms"]["treatment"]["errors"] > 0 and status["arms"]["treatment"]["error_rate"] > 0.01
    await asyncio.sleep(1.0)
    after = await arms_of(service, users)
    assert set(after.values()) == {"control"}
    await service.put("/api/v1/admin/faults", json={"arm": "treatment", "failing": False})


async def test_metrics_are_exported_for_prometheus(service, live_settings):
    wanted = {"ray_replay_buffer_size", "ray_q_table_size", "ray_pipeline_latency_seconds",
              "ray_batch_learning_success", "ray_arm_requests", "ray_arm_errors",
              "ray_experiences_dropped_total", "ray_rollout_weight", "ray_policy_version"}
    url = f"http://127.0.0.1:{live_settings.ray.metrics_port}/metrics"
    found: set[str] = set()
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=10) as scraper:
        while time.monotonic() < deadline and not wanted <= found:
            text = (await scraper.get(url)).text
            found = {family.name for family in text_string_to_metric_families(text)}
            await asyncio.sleep(2)
    assert wanted <= found, sorted(wanted - found)


def test_operator_commands(service, capsys):
    from cluster.cli import main as dtrag

    target = ["--url", str(service.base_url).rstrip("/"), "--api-key", service.headers["X-API-Key"]]
    assert dtrag(["flags", "set", "meta_planner=on", "--arm", "control", *target]) == 0
    shown = capsys.readouterr().out
    assert "meta_planner" in shown and "no behaviour yet" in shown
    assert dtrag(["flags", "show", *target]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("meta_planner"))
    assert row.split()[1:3] == ["on", "off"]
    assert dtrag(["flags", "set", "meta_planner=maybe", *target]) == 1
    assert "NAME=on or NAME=off" in capsys.readouterr().err

    assert dtrag(["rollout", "set-weight", "0.25", *target]) == 0
    assert "treatment 25%, control 75%" in capsys.readouterr().out
    assert dtrag(["rollout", "rollback", "--reason", "cli drill", *target]) == 0
    status = capsys.readouterr().out
    assert "treatment 0%" in status and "rolled back: cli drill" in status
    assert dtrag(["rollout", "status", *target]) == 0
    assert "mean reward" in capsys.readouterr().out
    assert dtrag(["rollout", "set-weight", "2", *target]) == 1
    assert "treatment_weight" in capsys.readouterr().err
