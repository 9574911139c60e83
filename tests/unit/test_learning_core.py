import dataclasses
import json
import pickle

import numpy as np
import pytest

from learners import checkpoint
from learners.learning_core import (
    COST_MEMORY,
    Experience,
    LearningConfig,
    LearningCore,
    RewardedSearch,
    policy_from_report,
)
from learners.replay import experience_columns
from learners.reward import judgements_from_clicks, reward
from learners.sharded_replay import ShardedReplay, shard_of
from learners.value_model import compute_deltas

ACTIONS = ("lexical", "hybrid@0.5", "hybrid@0.5+prf")
FEATURES = ("x0", "x1")
DEFAULT = 0
# The shipped hyperparameters (configs/settings.yaml); each test changes what it is about.
CONFIG = LearningConfig(capacity=10_000, alpha=0.6, beta0=0.4, beta_steps=100_000, tau=0.1, lr=0.0002,
                        gamma=0.0, prior_count=50.0, margin=0.005, explore_max=0.05, samples_per_insert=8.0,
                        min_replay_size=32, max_staleness=8, cost_weight=0.0005, context_bins=0, seed=0)


def config(**changes) -> LearningConfig:
    return dataclasses.replace(CONFIG, **changes)


def make_core(**changes) -> LearningCore:
    return LearningCore(ACTIONS, FEATURES, DEFAULT, config(**changes))


def experiences(n: int, action: int = 2, r: float = 1.0, context=(0.1, 0.2)) -> list[Experience]:
    return [Experience(context, action, r, 0.25, 0) for _ in range(n)]


def learn_once(core: LearningCore, batch_size: int = 8) -> bool:
    batch = core.sample(batch_size)
    assert batch is not None
    delta, td = compute_deltas(batch.snapshot, batch.transitions, batch.weights, batch.gamma)
    return core.apply_update(delta, batch.indices, batch.insertion_ids, td)


def action_rewards(x: np.ndarray) -> list[float]:
    """x0 decides: action 1 pays where x0 > 0.125, action 2 where x0 < -0.125, else action 0 (the best fixed one)."""
    return [0.55, 0.45 + 0.8 * x[0], 0.45 - 0.8 * x[0]]


def searches(rng: np.random.Generator, n: int, click_every: int = 4) -> list[RewardedSearch]:
    """Graded searches served with the default action, every `click_every`-th one a click instead."""
    out = []
    for i in range(n):
        x = rng.uniform(-1, 1, len(FEATURES))
        rewards = action_rewards(x)
        if i % click_every == 0:
            out.append(RewardedSearch(x.tolist(), DEFAULT, rewards[DEFAULT], 0.0, 1.0, 0))
        else:
            out.append(RewardedSearch(x.tolist(), DEFAULT, rewards[DEFAULT], 0.0, 1.0, 0, action_quality=rewards,
                                      action_costs=[0.0, 20.0, 20.0], action_probabilities=[1.0, 0.0, 0.0]))
    return out


def trained_core(**changes) -> LearningCore:
    """A core whose gate opened: the context model beat the pooled row on fresh searches."""
    core = make_core(min_replay_size=1, explore_max=0.5, **changes)
    rng = np.random.default_rng(0)
    for _ in range(12):
        core.add_searches(searches(rng, 40))
        for _ in range(100):  # bounded: a broken rate limit must fail, not hang
            if not core.can_sample(128):
                break
            learn_once(core, 128)
    return core


def test_rate_limit_and_minimum_size_gate_sampling():
    core = make_core(min_replay_size=4, samples_per_insert=2.0)
    core.add(experiences(3))
    assert core.sample(2) is None  # below the minimum size
    core.add(experiences(1))
    assert core.sample(8) is not None  # 8 <= 2 * 4
    assert core.sample(1) is None  # 9 > 8
    core.add(experiences(1))
    assert core.sample(2) is not None  # 10 <= 2 * 5
    assert core.stats()["sampled"] == 10 and core.stats()["inserted"] == 5


def test_learning_moves_q_towards_rewards_and_bumps_the_version():
    core = make_core(min_replay_size=1, samples_per_insert=100, prior_count=1.0)
    core.add(experiences(20, action=2, r=1.0) + experiences(20, action=0, r=0.0))
    version = core.policy().version
    for _ in range(20):
        assert learn_once(core)
    policy = core.policy()
    assert policy.version == policy.model.version == version + 20
    q = policy.model.values([0.1, 0.2])[0]
    assert q[2] == pytest.approx(1.0) and q[0] == pytest.approx(0.0, abs=1e-9)
    assert core.stats()["updates_applied"] == 20


def test_stale_updates_are_rejected_and_change_nothing():
    core = make_core(min_replay_size=1, samples_per_insert=100, max_staleness=1)
    core.add(experiences(10))
    old = core.sample(4)
    for _ in range(2):
        learn_once(core)
    delta, td = compute_deltas(old.snapshot, old.transitions, old.weights, old.gamma)
    before = core.state_dict()
    assert not core.apply_update(delta, old.indices, old.insertion_ids, td + 5.0)
    after = core.state_dict()
    assert after["model"]["version"] == before["model"]["version"]
    np.testing.assert_array_equal(after["model"]["gram"], before["model"]["gram"])
    np.testing.assert_array_equal(after["buffer"]["priorities"], before["buffer"]["priorities"])
    assert core.stats()["updates_rejected"] == 1
    # one version less stale is accepted
    fresh = core.sample(4)
    learn_once(core)
    delta, td = compute_deltas(fresh.snapshot, fresh.transitions, fresh.weights, fresh.gamma)
    assert core.apply_update(delta, fresh.indices, fresh.insertion_ids, td)


def test_bad_action_or_context_length_is_refused():
    core = make_core()
    with pytest.raises(ValueError, match="action 3"):
        core.add([Experience((0.0, 0.0), 3, 1.0, 0.5, 0)])
    with pytest.raises(ValueError, match="3 features"):
        core.add([Experience((0.0, 0.0, 0.0), 0, 1.0, 0.5, 0)])
    assert core.stats()["inserted"] == 0


def test_experiences_carry_their_context_and_next_context_into_replay():
    core = make_core(min_replay_size=1)
    core.add([Experience((0.5, -1.0), 1, 0.3, 0.5, 4, next_context=(2.0, 3.0)),
              Experience((0.25, 1.0), 2, 0.7, 0.5, 4)])
    state = core.buffer.state_dict()
    np.testing.assert_array_equal(state["context"][:2], [[0.5, -1.0], [0.25, 1.0]])
    np.testing.assert_array_equal(state["next_context"][:2], [[2.0, 3.0], [0.0, 0.0]])
    np.testing.assert_array_equal(state["has_next"][:2], [True, False])
    np.testing.assert_array_equal(state["action"][:2], [1, 2])


def test_state_dict_round_trip_restores_the_same_policy_and_buffer():
    core = trained_core()
    core.add(experiences(3) + [Experience((0.3, 0.1), 1, 0.2, 0.5, 0, next_context=(0.1, 0.0))])
    restored = make_core(min_replay_size=1, explore_max=0.5)
    restored.load_state_dict(checkpoint.decode(checkpoint.encode(core.state_dict())))  # as stored
    assert restored.stats() == core.stats()
    a, b = core.policy(), restored.policy()
    assert (a.version, a.model.gate_open, a.model.epsilon) == (b.version, b.model.gate_open, b.model.epsilon)
    x = np.random.default_rng(1).uniform(-1, 1, (50, len(FEATURES)))
    np.testing.assert_array_equal(a.model.values(x), b.model.values(x))
    np.testing.assert_array_equal(a.model.probabilities(x), b.model.probabilities(x))
    assert core.model.gates() == restored.model.gates()
    np.testing.assert_array_equal(core.expected_cost, restored.expected_cost)
    buffer_a, buffer_b = core.buffer.state_dict(), restored.buffer.state_dict()
    for key in buffer_a:
        np.testing.assert_array_equal(buffer_a[key], buffer_b[key], err_msg=key)
    sample_a, sample_b = core.sample(16), restored.sample(16)
    np.testing.assert_array_equal(sample_a.indices, sample_b.indices)
    np.testing.assert_array_equal(sample_a.weights, sample_b.weights)


@pytest.mark.parametrize("other", [
    dict(actions=("lexical", "hybrid@0.3", "hybrid@0.3+prf")),
    dict(features=("x0", "x2")),
    dict(capacity=5_000),
])
def test_load_refuses_other_actions_features_or_capacity_and_changes_nothing(other):
    source = LearningCore(other.get("actions", ACTIONS), other.get("features", FEATURES), DEFAULT,
                          config(min_replay_size=1, capacity=other.get("capacity", CONFIG.capacity)))
    source.add_searches(searches(np.random.default_rng(2), 20))
    target = make_core(min_replay_size=1)
    target.add(experiences(5))
    learn_once(target, 4)
    before = pickle.dumps(target.state_dict())
    with pytest.raises(ValueError):
        target.load_state_dict(source.state_dict())
    assert pickle.dumps(target.state_dict()) == before


def test_graded_feedback_teaches_every_action_and_clicks_only_the_served_one():
    full = RewardedSearch((0.1, 0.2), 2, 0.7, 30.0, 0.4, 3, action_quality=[0.1, 0.2, 0.7],
                          action_costs=[0.0, 20.0, 30.0], action_probabilities=[0.1, 0.5, 0.4])
    experiences = full.experiences([0.1, 0.19, 0.68])
    assert [(e.action, e.reward, e.propensity) for e in experiences] == [(2, 0.68, 0.4), (0, 0.1, 0.1), (1, 0.19, 0.5)]
    assert {(tuple(e.context), e.policy_version, e.next_context) for e in experiences} == {((0.1, 0.2), 3, None)}
    clicks = RewardedSearch((0.1, 0.2), 2, 0.7, 30.0, 0.4, 3, next_context=(0.3, 0.4),
                            action_probabilities=[0.1, 0.5, 0.4])
    assert clicks.experiences([0.0, 0.0, 0.68]) == [Experience((0.1, 0.2), 2, 0.68, 0.4, 3, (0.3, 0.4))]


def test_add_searches_inserts_every_actions_experience_for_graded_feedback_only():
    core = make_core()
    graded = RewardedSearch((0.1, 0.2), 0, 0.5, 0.0, 1.0, 0, action_quality=[0.5, 0.6, 0.4],
                            action_costs=[0.0, 10.0, 20.0], action_probabilities=[1.0, 0.0, 0.0])
    click = RewardedSearch((0.3, 0.4), 1, 0.9, 30.0, 0.5, 0)
    assert core.add_searches([graded, click]) == 4
    np.testing.assert_array_equal(core.policy().model.seen, [1, 2, 1])
    assert core.policy().model.epsilon == pytest.approx(CONFIG.explore_max / 2)


def test_rewards_charge_each_actions_expected_cost_not_the_searchs_measured_one():
    core = make_core()
    for dense_ms in (40.0, 60.0, 50.0):  # one action's cost varying with the machine's load
        search = RewardedSearch((0.1, 0.2), 0, 0.5, 0.0, 1.0, 0, action_quality=[0.5, 0.6, 0.7],
                                action_costs=[0.0, dense_ms, dense_ms + 14.0], action_probabilities=[1.0, 0.0, 0.0])
        rewards = core.rewards(search)
    np.testing.assert_allclose(core.expected_cost, [0.0, 50.0, 64.0])
    np.testing.assert_allclose(rewards, [0.5, 0.6 - 0.0005 * 50.0, 0.7 - 0.0005 * 64.0])
    click = RewardedSearch((0.1, 0.2), 1, 1.0, 70.0, 0.5, 0)  # only the served action's cost is measured
    assert core.rewards(click)[1] == pytest.approx(1.0 - 0.0005 * 55.0)
    np.testing.assert_allclose(core.expected_cost, [0.0, 55.0, 64.0])
    with pytest.raises(ValueError, match="action 3"):
        core.rewards(RewardedSearch((0.1, 0.2), 3, 1.0, 0.0, 1.0, 0))


def test_expected_costs_follow_the_last_measurements_once_memory_is_full():
    core = make_core()
    for cost in [10.0] * COST_MEMORY + [30.0] * (3 * COST_MEMORY):
        core.rewards(RewardedSearch((0.1, 0.2), 1, 1.0, cost, 1.0, 0))
    assert core.expected_cost[1] == pytest.approx(30.0, abs=1.0)


def test_a_stored_row_becomes_a_rewarded_search_by_column_name():
    row = {"context": [0.1, 0.2], "action": 1, "quality": 0.5, "cost": 12.0, "propensity": 0.25,
           "policy_version": 2, "next_context": None, "action_quality": None, "action_costs": None,
           "action_probabilities": None, "arm": "control"}
    assert RewardedSearch.from_row(row) == RewardedSearch([0.1, 0.2], 1, 0.5, 12.0, 0.25, 2)


def test_forget_bumps_the_version_and_empties_replay():
    core = trained_core()
    version = core.policy().version
    core.forget()
    assert core.policy().version > version
    assert len(core.buffer) == 0 and core.sample(1) is None
    assert core.stats()["inserted"] == core.stats()["sampled"] == 0
    np.testing.assert_array_equal(core.policy().model.values([[0.5, 0.5]]), [[0.0, 0.0, 0.0]])
    assert all(gate["n"] == 0 for gate in core.model.gates()) and not core.policy().model.gate_open


def test_policy_from_report_reproduces_the_snapshots_greedy_actions_and_probabilities():
    core = trained_core(margin=0.2)  # a margin wide enough to decide some contexts
    snapshot = core.policy().model
    assert snapshot.gate_open and 0 < snapshot.epsilon < 1  # a policy that uses context and explores
    report = json.loads(json.dumps(core.model_report()))  # as fetched over HTTP
    policy = policy_from_report(report)
    x = np.random.default_rng(3).uniform(-1, 1, (200, len(FEATURES)))
    greedy = snapshot.greedy_actions(x)
    assert len(set(greedy.tolist())) == 3  # the test can tell policies apart
    np.testing.assert_array_equal(policy.greedy_actions(x), greedy)
    np.testing.assert_allclose(policy.probabilities(x), snapshot.probabilities(x), rtol=1e-12)
    assert policy.version == snapshot.version


def test_model_report_describes_the_last_search():
    core = trained_core()
    report = core.model_report()
    last = core.last_context
    assert list(report["sample"]["context"].values()) == last
    values = core.policy().model.values(np.asarray(last))[0]
    assert list(report["sample"]["values"].values()) == pytest.approx(values.tolist())
    assert report["sample"]["greedy"] == ACTIONS[int(np.argmax(list(report["sample"]["probabilities"].values())))]


def test_reward_is_ndcg_of_the_served_list():
    assert reward(["a", "b"], {"a": 1}) == pytest.approx(1.0)
    assert reward(["b", "a"], {"a": 1}) == pytest.approx(1 / np.log2(3))
    assert reward(["x"], {"a": 2}) == 0.0
    assert reward([], {"a": 1}) == 0.0
    assert reward(["a", "b"], judgements_from_clicks(["b"])) == pytest.approx(1 / np.log2(3))


def sharded_core(num_shards: int, **changes) -> LearningCore:
    c = config(**changes)
    shards = ShardedReplay.create(num_shards, c.capacity, experience_columns(len(FEATURES), len(ACTIONS)), c.alpha, c.beta0,
                                  c.beta_steps, seed=1)
    return LearningCore(ACTIONS, FEATURES, DEFAULT, c, shards=shards)


def test_a_sharded_core_keeps_each_search_on_its_contexts_shard_and_routes_priorities_back():
    core = sharded_core(3, min_replay_size=1)
    rng = np.random.default_rng(4)
    graded = [s for s in searches(rng, 60) if s.graded]
    core.add_searches(graded)
    shards = core.replay.shards
    assert [len(shard) for shard in shards] == np.bincount(
        [shard_of(s.context, 3) for s in graded for _ in ACTIONS], minlength=3).tolist()
    assert min(len(shard) for shard in shards) > 0  # the hash spreads them
    for s, shard in enumerate(shards):  # every experience of a search sits on the shard of its context
        contexts = shard.state_dict()["context"][: len(shard)]
        assert {shard_of(x, 3) for x in contexts} == {s}
    batch = core.sample(64)
    np.testing.assert_array_equal(batch.transitions.contexts.astype(np.float32), np.concatenate(
        [shards[i % 3].state_dict()["context"][[i // 3]] for i in batch.indices]))
    before = [shard.priorities.copy() for shard in shards]
    delta, _ = compute_deltas(batch.snapshot, batch.transitions, batch.weights, batch.gamma)
    assert core.apply_update(delta, batch.indices, batch.insertion_ids, np.full(64, 9.0))
    for s, shard in enumerate(shards):
        changed = np.flatnonzero(shard.priorities != before[s])
        assert set(changed) == {i // 3 for i in batch.indices if i % 3 == s}
    assert core.stats()["replay_shards"] == [len(shard) for shard in shards]


def test_a_core_over_shards_it_does_not_own_leaves_them_out_of_its_state_and_empties_them_on_forget():
    core = sharded_core(2, min_replay_size=1)
    core.add_searches(searches(np.random.default_rng(5), 20))
    state = core.state_dict()
    assert "buffer" not in state
    other = LearningCore(ACTIONS, FEATURES, DEFAULT, core.config, shards=core.replay)
    other.load_state_dict(state)
    assert len(other.replay) == len(core.replay) > 0  # a new core over the shards does not empty them
    with pytest.raises(ValueError, match="no local buffer"):
        other.buffer
    other.forget()
    assert len(core.replay) == 0


def test_a_binned_policy_survives_the_report_before_and_after_its_edges_are_learned():
    fresh = make_core(context_bins=3)
    report = json.loads(json.dumps(fresh.model_report(), allow_nan=False))  # strict JSON: no inf edges
    assert report["context_bins"] == {"bins": 3, "edges": None}
    x = np.random.default_rng(4).uniform(-1, 1, (50, len(FEATURES)))
    np.testing.assert_array_equal(policy_from_report(report).values(x), fresh.policy().model.values(x))

    core = trained_core(margin=0.2, context_bins=3)
    snapshot = core.policy().model
    assert snapshot.bins.learned
    report = json.loads(json.dumps(core.model_report(), allow_nan=False))
    assert list(report["theta"]["lexical"]) == ["intercept", "x0>q1", "x0>q2", "x1>q1", "x1>q2"]
    policy = policy_from_report(report)
    np.testing.assert_allclose(policy.values(x), snapshot.values(x), rtol=1e-12)
    np.testing.assert_array_equal(policy.greedy_actions(x), snapshot.greedy_actions(x))


def test_a_graded_searchs_experiences_carry_every_actions_reward_and_a_clicks_do_not():
    core = make_core(min_replay_size=1, samples_per_insert=100.0)
    graded = RewardedSearch((0.1, 0.2), 0, 0.5, 0.0, 1.0, 0, action_quality=[0.5, 0.6, 0.4],
                            action_costs=[0.0, 10.0, 20.0], action_probabilities=[1.0, 0.0, 0.0])
    click = RewardedSearch((0.3, 0.4), 1, 0.9, 30.0, 0.5, 0)
    core.add_searches([graded, click])
    expected = [0.5, 0.6 - 0.0005 * 10.0, 0.4 - 0.0005 * 20.0]  # its first measured costs
    batch = core.sample(64).transitions
    for context, rewards in zip(batch.contexts, batch.search_rewards, strict=True):
        if context[0] == pytest.approx(0.1):
            np.testing.assert_allclose(rewards, expected, rtol=1e-6)
        else:
            assert np.isnan(rewards).all()
