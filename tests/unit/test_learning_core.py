import numpy as np
import pytest

import dataclasses

from learners.learning_core import Experience, LearningConfig, LearningCore, RewardedSearch
from learners.replay import NO_NEXT_STATE
from learners.reward import judgements_from_clicks, reward
from learners.soft_q import compute_deltas
from learners.state_encoder import state_id

ACTIONS = ("lexical", "dense", "hybrid_rrf", "hybrid_weighted")
STATE_KEY = "len=short|form=keyword|agree=low|digits=no"
OTHER_KEY = "len=long|form=question|agree=high|digits=yes"
STATE, OTHER = state_id(STATE_KEY), state_id(OTHER_KEY)
# The shipped hyperparameters (configs/settings.yaml); each test changes what it is about.
CONFIG = LearningConfig(capacity=10_000, alpha=0.6, beta0=0.4, beta_steps=100_000, tau=0.1, lr=0.001,
                        gamma=0.0, prior_count=200.0, samples_per_insert=8.0, min_replay_size=32,
                        max_staleness=8, seed=0)


def config(**changes) -> LearningConfig:
    return dataclasses.replace(CONFIG, **changes)


def experiences(n: int, state: int = STATE, action: int = 2, r: float = 1.0) -> list[Experience]:
    return [Experience(state, action, r, 0.25, 0) for _ in range(n)]


def learn_once(core: LearningCore, batch_size: int = 8) -> bool:
    batch = core.sample(batch_size)
    assert batch is not None
    delta, td = compute_deltas(batch.snapshot, batch.transitions, batch.weights,
                               batch.tau, batch.gamma, batch.lr)
    return core.apply_update(delta, batch.indices, batch.insertion_ids, td)


def test_rate_limit_and_minimum_size_gate_sampling():
    core = LearningCore(ACTIONS, config(min_replay_size=4, samples_per_insert=2.0))
    core.add(experiences(3))
    assert core.sample(2) is None  # below the minimum size
    core.add(experiences(1))
    assert core.sample(8) is not None  # 8 <= 2 * 4
    assert core.sample(1) is None  # 9 > 8
    core.add(experiences(1))
    assert core.sample(2) is not None  # 10 <= 2 * 5


def test_learning_moves_q_towards_rewards_and_bumps_version():
    core = LearningCore(ACTIONS, config(min_replay_size=1, samples_per_insert=100, lr=0.5))
    core.add(experiences(20, action=2, r=1.0) + experiences(20, action=0, r=0.0))
    for _ in range(20):
        assert learn_once(core)
    policy = core.policy()
    assert policy.version == 20
    q = policy.q.values([STATE])[0]
    assert q[2] > 0.9 and abs(q[0]) < 1e-9
    assert core.stats()["updates_applied"] == 20


def test_stale_updates_are_rejected_and_change_nothing():
    core = LearningCore(ACTIONS, config(min_replay_size=1, samples_per_insert=100, max_staleness=1))
    core.add(experiences(10))
    old = core.sample(4)
    for _ in range(2):
        learn_once(core)
    delta, td = compute_deltas(old.snapshot, old.transitions, old.weights, old.tau, old.gamma, old.lr)
    before = core.policy()
    assert not core.apply_update(delta, old.indices, old.insertion_ids, td)
    assert core.policy().version == before.version
    assert core.stats()["updates_rejected"] == 1


def test_bad_action_is_refused():
    core = LearningCore(ACTIONS, CONFIG)
    with pytest.raises(ValueError, match="action 4"):
        core.add([Experience(STATE, 4, 1.0, 0.5, 0)])


def test_state_dict_round_trip_resumes_exactly():
    resumable = config(min_replay_size=1, samples_per_insert=100)
    core = LearningCore(ACTIONS, resumable)
    core.add(experiences(10) + [Experience(OTHER, 1, 0.3, 0.5, 0, next_state=STATE)])
    learn_once(core)
    restored = LearningCore(ACTIONS, resumable)
    restored.load_state_dict(core.state_dict())
    assert restored.stats() == core.stats()
    assert restored.q_table() == core.q_table()
    a, b = core.sample(4), restored.sample(4)
    assert np.array_equal(a.indices, b.indices) and np.allclose(a.weights, b.weights)


def test_reward_is_ndcg_of_the_served_list():
    assert reward(["a", "b"], {"a": 1}) == pytest.approx(1.0)
    assert reward(["b", "a"], {"a": 1}) == pytest.approx(1 / np.log2(3))
    assert reward(["x"], {"a": 2}) == 0.0
    assert reward([], {"a": 1}) == 0.0
    assert reward(["a", "b"], judgements_from_clicks(["b"])) == pytest.approx(1 / np.log2(3))


def test_graded_feedback_teaches_every_action_and_clicks_only_the_served_one():
    full = RewardedSearch(STATE_KEY, 2, 0.7, 0.4, 3, action_rewards=[0.1, 0.2, 0.7, 0.9],
                          action_probabilities=[0.1, 0.2, 0.4, 0.3]).experiences()
    assert [(e.action, e.reward, e.propensity) for e in full] == [
        (2, 0.7, 0.4), (0, 0.1, 0.1), (1, 0.2, 0.2), (3, 0.9, 0.3)]
    assert {(e.state, e.policy_version, e.next_state) for e in full} == {(STATE, 3, NO_NEXT_STATE)}
    clicks = RewardedSearch(STATE_KEY, 2, 0.7, 0.4, 3, next_state_key=OTHER_KEY,
                            action_probabilities=[0.1, 0.2, 0.4, 0.3]).experiences()
    assert clicks == [Experience(STATE, 2, 0.7, 0.4, 3, OTHER)]


def test_a_stored_row_becomes_a_rewarded_search_by_column_name():
    row = {"state_key": STATE_KEY, "action": 1, "reward": 0.5, "propensity": 0.25, "policy_version": 2,
           "next_state_key": None, "action_rewards": None, "action_probabilities": None, "arm": "control"}
    assert RewardedSearch.from_row(row) == RewardedSearch(STATE_KEY, 1, 0.5, 0.25, 2)
