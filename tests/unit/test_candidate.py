import dataclasses

import numpy as np
import pytest

from learners import checkpoint as codec
from learners.candidate import CandidateError, decode, encode, fit, judge
from learners.learning_core import LearningConfig, RewardedSearch
from learners.off_policy import LoggedSearches
from learners.value_model import ValueSnapshot

ACTIONS = ("lexical", "hybrid@0.5", "hybrid@0.7")
FEATURES = ("x0", "x1")
DEFAULT = 0
CONFIG = LearningConfig(capacity=10_000, alpha=0.6, beta0=0.4, beta_steps=100_000, tau=0.1, lr=0.0002,
                        gamma=0.0, prior_count=50.0, margin=0.005, explore_max=0.05, samples_per_insert=8.0,
                        min_replay_size=32, max_staleness=8, cost_weight=0.0, context_bins=0, seed=0)


def mean_quality(x: np.ndarray) -> np.ndarray:
    """(n, A): action 1 pays where x0 > 0.125, action 2 where x0 < -0.125, else action 0."""
    return np.column_stack([np.full(len(x), 0.55), 0.45 + 0.8 * x[:, 0], 0.45 - 0.8 * x[:, 0]])


def graded_searches(seed: int, n: int) -> list[RewardedSearch]:
    """Searches served with the default action and judged for every action, as `dtrag train` sends them."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, len(FEATURES)))
    quality = mean_quality(x) + rng.normal(0, 0.05, (n, len(ACTIONS)))
    return [RewardedSearch(xi.tolist(), DEFAULT, float(q[DEFAULT]), 0.0, 1.0, 0, action_quality=q.tolist(),
                           action_costs=[0.0] * len(ACTIONS), action_probabilities=[1.0, 0.0, 0.0])
            for xi, q in zip(x, quality, strict=True)]


def logged_clicks(seed: int, n: int = 4000) -> LoggedSearches:
    """Served searches of an exploring behaviour policy with their propensities (what the service logs)."""
    rng = np.random.default_rng(100 + seed)
    x = rng.uniform(-1, 1, (n, len(FEATURES)))
    mu = np.array([0.6, 0.2, 0.2])
    actions = rng.choice(len(ACTIONS), size=n, p=mu)
    rewards = mean_quality(x)[np.arange(n), actions] + rng.normal(0, 0.05, n)
    return LoggedSearches.usable(x, actions, mu[actions], rewards)


def true_value(policy: ValueSnapshot, n: int = 100_000) -> float:
    x = np.random.default_rng(7).uniform(-1, 1, (n, len(FEATURES)))
    return float((policy.probabilities(x) * mean_quality(x)).sum(axis=1).mean())


@pytest.fixture(scope="module")
def candidate():
    return fit("context-rule", "retrieval", graded_searches(0, 1500), ACTIONS, FEATURES, DEFAULT, CONFIG,
               batch_size=32, trained_on={"source": "simulated"})


def default_policy() -> ValueSnapshot:
    return fit("untrained", "retrieval", [], ACTIONS, FEATURES, DEFAULT, CONFIG, 32).value_model(
        CONFIG, DEFAULT).snapshot()


def test_fit_learns_the_context_rule_the_service_would(candidate):
    policy = candidate.value_model(CONFIG, DEFAULT).snapshot()
    assert set(policy.open_actions) == {1, 2}, "both context-dependent actions earned their gate"
    x = np.array([[0.6, 0.0], [-0.6, 0.0], [0.0, 0.9]])
    assert policy.greedy_actions(x).tolist() == [1, 2, 0]
    assert candidate.trained_on == {"searches": 1500, "source": "simulated"}


def test_a_candidate_survives_its_file_and_other_bytes_are_refused(candidate):
    again = decode(encode(candidate))
    assert (again.name, again.head, again.actions, again.features) == (
        candidate.name, candidate.head, candidate.actions, candidate.features)
    x = np.random.default_rng(1).uniform(-1, 1, (50, 2))
    assert np.array_equal(again.value_model(CONFIG, DEFAULT).snapshot().probabilities(x),
                          candidate.value_model(CONFIG, DEFAULT).snapshot().probabilities(x))
    with pytest.raises(CandidateError, match="not a candidate policy file"):
        decode(b"PK\x03\x04 something zipped")
    with pytest.raises(CandidateError, match="checkpoint of something else"):
        decode(codec.encode({"retrieval": {"model": {}}}))
    with pytest.raises(CandidateError, match="unusable model"):
        dataclasses.replace(candidate, model={"format": 1}).value_model(CONFIG, DEFAULT)


def test_a_candidate_for_other_actions_or_features_is_refused_with_what_to_do(candidate):
    candidate.check_fits("retrieval", ACTIONS, FEATURES)
    with pytest.raises(CandidateError, match="is for the 'retrieval' head, not 'answer'"):
        candidate.check_fits("answer", ACTIONS, FEATURES)
    with pytest.raises(CandidateError, match="refit it on logs exported from this service"):
        candidate.check_fits("retrieval", ACTIONS[:2], FEATURES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_judge_covers_the_true_difference_and_orders_the_policies(candidate, seed):
    logs = logged_clicks(seed)
    better, worse = candidate.value_model(CONFIG, DEFAULT).snapshot(), default_policy()
    truth = true_value(better) - true_value(worse)
    judgement = judge(logs, better, worse, margin=0.005, seed=seed)
    assert judgement.difference.low <= truth <= judgement.difference.high
    assert judgement.difference.low > 0 and not judgement.worse
    assert judge(logs, worse, better, margin=0.005, seed=seed).worse


def test_judge_refuses_to_judge_on_nothing():
    policy = default_policy()
    with pytest.raises(ValueError, match="no usable logged searches"):
        judge(LoggedSearches.usable(np.zeros((1, 2)), [0], [0.0], [1.0]), policy, policy, 0.005)
