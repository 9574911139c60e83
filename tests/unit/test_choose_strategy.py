import numpy as np
import pytest

from cluster.core.vocabulary import STRATEGIES, Strategy
from learners.learning_core import PolicySnapshot
from learners.soft_q import QSnapshot
from learners.state_encoder import state_id
from serve_app.pipeline import choose_strategy

STATE = "len=short|form=keyword|agree=low|digits=no"


def policy(q_row, version=7, tau=0.5, pooled=(0.0, 0.0, 0.0, 0.0)) -> PolicySnapshot:
    """Q(STATE, .) = q_row (its own means, no prior); an unseen state gets `pooled`."""
    q = QSnapshot(version, np.array(pooled, float), np.array([q_row], float), {state_id(STATE): 0},
                  np.ones(4), np.ones((1, 4)), prior_count=0.0, horizon=1000.0)
    return PolicySnapshot(version, STRATEGIES, tau, q)


def test_requested_strategy_wins_and_is_certain():
    decision = choose_strategy(STATE, Strategy.DENSE, Strategy.HYBRID_RRF, policy([9, 0, 0, 0]), True,
                               np.random.default_rng(0))
    assert (decision.strategy, decision.action, decision.propensity, decision.policy_version) == (
        "dense", 1, 1.0, 7)
    assert decision.probabilities == (0.0, 1.0, 0.0, 0.0)


def test_without_the_bandit_the_default_is_used():
    decision = choose_strategy(STATE, None, Strategy.HYBRID_RRF, policy([9, 0, 0, 0]), False,
                               np.random.default_rng(0))
    assert (decision.strategy, decision.action, decision.propensity) == ("hybrid_rrf", 2, 1.0)


def test_bandit_samples_from_softmax_and_logs_the_propensity():
    q = [1.0, 0.0, 0.5, 0.0]
    probs = np.exp(np.array(q) / 0.5) / np.exp(np.array(q) / 0.5).sum()
    rng = np.random.default_rng(1)
    decisions = [choose_strategy(STATE, None, Strategy.HYBRID_RRF, policy(q), True, rng) for _ in range(4000)]
    for decision in decisions[:20]:
        assert decision.propensity == pytest.approx(probs[decision.action])
        assert decision.strategy == STRATEGIES[decision.action]
    frequencies = np.bincount([d.action for d in decisions], minlength=4) / len(decisions)
    np.testing.assert_allclose(frequencies, probs, atol=0.03)


def test_bandit_without_a_policy_is_uniform_and_unseen_states_follow_the_pooled_row():
    rng = np.random.default_rng(2)
    no_policy = choose_strategy(STATE, None, Strategy.HYBRID_RRF, None, True, rng)
    assert no_policy.propensity == pytest.approx(0.25) and no_policy.policy_version == 0
    assert no_policy.probabilities == pytest.approx((0.25,) * 4)
    unseen = choose_strategy("len=long|form=question|agree=high|digits=yes", None, Strategy.HYBRID_RRF,
                             policy([5, 0, 0, 0], pooled=(0, 0, 0.5, 0)), True, rng)
    pooled_policy = np.exp(np.array([0, 0, 0.5, 0]) / 0.5) / np.exp(np.array([0, 0, 0.5, 0]) / 0.5).sum()
    np.testing.assert_allclose(unseen.probabilities, pooled_policy)
