import numpy as np
import pytest
from scipy.special import chdtrc  # chi-square survival function; scipy.stats imports in ~2 s

from cluster.core.actions import RetrievalAction, retrieval_actions
from cluster.core.vocabulary import Strategy
from learners.learning_core import PolicySnapshot
from learners.value_model import Transitions, ValueModel, compute_deltas, fold_of
from serve_app.decisions import decide, decide_answer

ACTIONS = retrieval_actions((0.3, 0.5, 0.7))  # lexical, hybrid@0.3, hybrid@0.3+prf, hybrid@0.5, ...
FEATURES = ("x0", "x1")
CONTEXT = np.array([0.2, -0.4])
FUSION_WEIGHT = 0.5
AT_FUSION_WEIGHT = 3  # hybrid@0.5
ORIGINAL = (Strategy.LEXICAL, Strategy.DENSE, Strategy.HYBRID_RRF, Strategy.HYBRID_WEIGHTED)


def policy(version: int = 7, explore_max: float = 0.6) -> PolicySnapshot:
    """A model that learned Q(x, a) = a / 10 for every x, exploring with explore_max (no feedback yet)."""
    model = ValueModel(len(ACTIONS), len(FEATURES), prior_count=1.0, lr=1e-3, tau=0.25, margin=0.0,
                       explore_max=explore_max, default_action=AT_FUSION_WEIGHT)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, len(FEATURES)))
    a = np.arange(700) % len(ACTIONS)
    batch = Transitions(x, np.array([fold_of(c) for c in x]), a, a / 10, np.zeros_like(x), np.zeros(700, bool))
    model.apply_deltas(compute_deltas(model.snapshot(), batch, np.ones(700), 0.0)[0])
    return PolicySnapshot(version, tuple(a.name for a in ACTIONS), FEATURES, model.snapshot())


def run(requested=None, default=Strategy.HYBRID_COMPLETE, current=None, use_policy=True, seed=0,
        fusion_weight=FUSION_WEIGHT):
    return decide(CONTEXT, requested, default, fusion_weight, ACTIONS, current, use_policy,
                  np.random.default_rng(seed))


@pytest.mark.parametrize("requested", ORIGINAL)
def test_a_requested_original_strategy_wins_with_propensity_one_and_no_index(requested):
    decision = run(requested, current=policy())
    assert (decision.action, decision.name, decision.index, decision.propensity) == (
        None, requested, None, 1.0)
    assert decision.probabilities == () and decision.policy_version == 7


def test_requested_hybrid_complete_maps_to_the_action_at_the_fusion_weight():
    decision = run(Strategy.HYBRID_COMPLETE, default=Strategy.LEXICAL, current=policy())
    assert decision.action == RetrievalAction(FUSION_WEIGHT) and decision.name == "hybrid@0.5"
    assert decision.index == AT_FUSION_WEIGHT and decision.propensity == 1.0
    assert decision.probabilities == tuple(float(i == AT_FUSION_WEIGHT) for i in range(len(ACTIONS)))
    other = run(Strategy.HYBRID_COMPLETE, current=policy(), fusion_weight=0.7)
    assert other.index == 5 and other.name == "hybrid@0.7"


def test_a_fusion_weight_outside_the_grid_is_served_but_not_an_action():
    decision = run(Strategy.HYBRID_COMPLETE, fusion_weight=0.4)
    assert decision.action == RetrievalAction(0.4) and decision.index is None and decision.propensity == 1.0


@pytest.mark.parametrize("default", [Strategy.HYBRID_RRF, Strategy.HYBRID_COMPLETE])
def test_without_the_bandit_the_default_is_served(default):
    decision = run(default=default, current=policy(), use_policy=False)
    assert decision.name == (default if default in ORIGINAL else "hybrid@0.5")
    assert decision.propensity == 1.0 and decision.policy_version == 7


def test_the_bandit_without_a_policy_serves_the_default_action_with_certainty():
    decision = run(current=None)
    assert decision.index == AT_FUSION_WEIGHT and decision.name == "hybrid@0.5"
    assert decision.probabilities == tuple(float(i == AT_FUSION_WEIGHT) for i in range(len(ACTIONS)))
    assert decision.propensity == 1.0 and decision.policy_version == 0


def test_the_bandit_samples_from_the_policy_and_logs_the_propensity_of_its_choice():
    current = policy()
    expected = current.model.probabilities(CONTEXT)[0]
    assert expected.max() < 0.9 and expected.min() > 0.01  # both the greedy part and exploration show
    rng = np.random.default_rng(1)
    n = 3000
    decisions = [decide(CONTEXT, None, Strategy.HYBRID_COMPLETE, FUSION_WEIGHT, ACTIONS, current, True, rng)
                 for _ in range(n)]
    indices = np.array([d.index for d in decisions])
    np.testing.assert_allclose([d.propensity for d in decisions], expected[indices], rtol=1e-12)
    np.testing.assert_allclose([d.probabilities for d in decisions[:50]], np.tile(expected, (50, 1)), rtol=1e-12)
    for d in decisions[:50]:
        assert d.action == ACTIONS[d.index] and d.name == ACTIONS[d.index].name and d.policy_version == 7
    counts = np.bincount(indices, minlength=len(ACTIONS))
    chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum()
    assert chdtrc(len(ACTIONS) - 1, chi2) > 0.001
    # The test can fail: the greedy action alone, or uniform sampling, are rejected.
    uniform = np.full(len(ACTIONS), n / len(ACTIONS))
    assert chdtrc(len(ACTIONS) - 1, ((counts - uniform) ** 2 / uniform).sum()) < 1e-6
    assert counts[AT_FUSION_WEIGHT] < n



MODES = ("extractive", "generated", "debate")


def answer_policy(explore_max: float) -> PolicySnapshot:
    """An answer model that learned Q(x, mode) = index / 10: debate best, then generated."""
    model = ValueModel(len(MODES), len(FEATURES), prior_count=1.0, lr=1e-3, tau=0.25, margin=0.0,
                       explore_max=explore_max, default_action=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, len(FEATURES)))
    a = np.arange(300) % len(MODES)
    batch = Transitions(x, np.array([fold_of(c) for c in x]), a, a / 10, np.zeros_like(x), np.zeros(300, bool))
    model.apply_deltas(compute_deltas(model.snapshot(), batch, np.ones(300), 0.0)[0])
    return PolicySnapshot(3, MODES, FEATURES, model.snapshot())


def test_a_named_answer_mode_is_served_as_asked_and_not_learned_from():
    decision = decide_answer(CONTEXT, "extractive", False, MODES, True, answer_policy(0.5), True,
                             np.random.default_rng(0))
    assert (decision.name, decision.index, decision.propensity) == ("extractive", None, 1.0)


def test_auto_without_the_bandit_serves_the_rule_as_a_logged_certain_choice():
    decision = decide_answer(CONTEXT, "generated", True, MODES, False, answer_policy(0.5), False,
                             np.random.default_rng(0))
    assert (decision.name, decision.index, decision.probabilities) == ("generated", 1, (0.0, 1.0, 0.0))


@pytest.mark.parametrize("debate_allowed", [True, False])
def test_the_answer_policy_samples_its_probabilities_and_debates_only_where_allowed(debate_allowed):
    rng, current = np.random.default_rng(0), answer_policy(0.3)
    decisions = [decide_answer(CONTEXT, "generated", True, MODES, debate_allowed, current, True, rng)
                 for _ in range(3000)]
    probabilities = np.array(decisions[0].probabilities)
    assert probabilities.sum() == pytest.approx(1)
    # a fresh model serves its default (generated) and explores over the allowed modes only
    assert probabilities[1] > 0.5 and bool(probabilities[2] > 0) is debate_allowed
    counts = np.bincount([d.index for d in decisions], minlength=len(MODES))
    assert np.abs(counts / len(decisions) - probabilities).max() < 0.03
    assert all(d.propensity == probabilities[d.index] and d.name == MODES[d.index] for d in decisions)
