from pathlib import Path

import numpy as np
import pytest

import yaml

from cluster.core.rollout import (
    ArmWindow,
    Gates,
    GuardSettings,
    RolloutState,
    compare_rewards,
    gate_failures,
    parse_plan,
)
from cluster.core.vocabulary import Arm, FeatureFlags

GATES = Gates(max_error_rate=0.01, max_p95_increase_ms=100, max_replica_memory_mb=800, min_reward_delta=-0.05)
GUARD = GuardSettings(check_interval_s=1, window_s=60, failures_to_rollback=2, min_requests=10, min_rewards=10)


def window(latencies, errors=0, rewards=(), memory=None, at=100.0) -> ArmWindow:
    arm = ArmWindow(window_s=60)
    for i, latency in enumerate(latencies):
        arm.record_request(at, latency, i < errors)
    for reward in rewards:
        arm.record_reward(at, reward)
    if memory is not None:
        arm.record_memory(at, "replica-1", memory)
    return arm


SHIPPED = Path(__file__).parents[2].joinpath("configs/rollout.yaml").read_text()


def test_shipped_plan_has_the_four_stages():
    plan = parse_plan(yaml.safe_load(SHIPPED))
    assert [s.name for s in plan.stages] == ["baseline", "replay_10", "softq_replay_50", "full"]
    assert [s.treatment_weight for s in plan.stages] == [0.0, 0.1, 0.5, 1.0]
    assert plan.stages[2].treatment_flags == {"experience_replay": True, "soft_q_bandit": True}
    assert plan.next_stage("baseline").name == "replay_10"
    with pytest.raises(ValueError, match="last stage"):
        plan.next_stage("full")


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="stage 'replay_10': unknown flag 'time_travel'"):
        parse_plan(yaml.safe_load(SHIPPED.replace("{experience_replay: true}", "{time_travel: true}")))
    with pytest.raises(ValueError, match="baseline"):
        parse_plan(yaml.safe_load(SHIPPED.replace("treatment_weight: 0.0", "treatment_weight: 0.3")))


def test_rollout_state_starts_at_baseline_and_survives_its_json():
    plan = parse_plan(yaml.safe_load(SHIPPED))
    state = RolloutState.initial(plan, FeatureFlags(debate_mode=True))
    assert (state.version, state.stage, state.treatment_weight) == (1, "baseline", 0.0)
    assert state.flags[Arm.TREATMENT] == state.flags[Arm.CONTROL] == FeatureFlags(debate_mode=True)
    assert RolloutState.from_json(state.to_json()) == state


def test_summary_trims_the_window_and_computes_percentiles():
    arm = window(list(range(1, 101)), errors=5, rewards=[0.5, 0.7], memory=300)
    arm.record_request(10.0, 10_000, True)  # older than the window: ignored
    summary = arm.summary(now=120.0)
    assert (summary.requests, summary.errors) == (100, 5)
    assert summary.p50_ms == pytest.approx(50.5) and summary.p95_ms == pytest.approx(95.05)
    assert summary.mean_reward == pytest.approx(0.6) and summary.max_memory_mb == 300
    low, high = summary.reward_ci95
    assert low < 0.6 < high


def test_observations_from_before_the_window_opened_are_not_counted():
    arm = ArmWindow(window_s=60, opened_at=100.0)
    arm.record_request(99.5, 50, True)  # a late batch from the configuration this window replaced
    arm.record_reward(99.5, 0.0)
    arm.record_memory(99.5, "replica-1", 300)  # the replica's memory, whatever its configuration
    arm.record_request(100.5, 40, False)
    summary = arm.summary(now=101.0)
    assert (summary.requests, summary.errors, summary.rewards) == (1, 0, 0)
    assert summary.max_memory_mb == 300


def test_gates_pass_a_healthy_treatment_and_name_each_breach():
    control = window([50] * 20).summary(100)
    assert gate_failures(GATES, GUARD, control, window([60] * 20).summary(100), None) == []
    failing = window([400] * 20, errors=5, memory=900).summary(100)
    failures = gate_failures(GATES, GUARD, control, failing, None)
    assert len(failures) == 3
    assert any("error rate" in f for f in failures) and any("p95" in f for f in failures)
    assert any("memory" in f for f in failures)


def test_too_few_requests_are_not_judged():
    control = window([50] * 20).summary(100)
    assert gate_failures(GATES, GUARD, control, window([900] * 5, errors=5).summary(100), None) == []


def test_reward_comparison_and_quality_gate():
    rng = np.random.default_rng(0)
    control, worse = rng.normal(0.6, 0.1, 200), rng.normal(0.4, 0.1, 200)
    comparison = compare_rewards(control, worse)
    assert comparison.significant and comparison.delta == pytest.approx(worse.mean() - control.mean())
    assert comparison.ci95[0] < comparison.delta < comparison.ci95[1]
    failures = gate_failures(GATES, GUARD, window([50] * 20, rewards=control).summary(100),
                             window([50] * 20, rewards=worse).summary(100), comparison)
    assert failures and "mean reward" in failures[0]
    same = compare_rewards(control, rng.normal(0.6, 0.1, 200))
    assert not same.significant
    assert compare_rewards(control[:1], worse) is None
