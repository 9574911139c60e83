import pickle

import numpy as np
import pytest

from learners.value_model import (
    BIN_SAMPLE,
    FOLDS,
    GATE_HORIZON,
    MIN_SAMPLES,
    Transitions,
    ValueModel,
    ValueSnapshot,
    compute_deltas,
    fold_of,
    policy_from_q,
)


def make_model(n_actions: int = 3, n_features: int = 2, **changes) -> ValueModel:
    """No ridge, no forgetting, no margin, no exploration unless a test sets them."""
    options = dict(prior_count=0.0, lr=1e-9, tau=0.1, margin=0.0, explore_max=0.0, default_action=0)
    return ValueModel(n_actions, n_features, **{**options, **changes})


def transitions(contexts, actions, rewards, next_contexts=None, has_next=None, folds=None) -> Transitions:
    contexts = np.asarray(contexts, np.float64)
    folds = np.array([fold_of(x) for x in contexts]) if folds is None else np.asarray(folds)
    next_contexts = np.zeros_like(contexts) if next_contexts is None else np.asarray(next_contexts, np.float64)
    has_next = np.zeros(len(contexts), bool) if has_next is None else np.asarray(has_next, bool)
    return Transitions(contexts, folds, np.asarray(actions), np.asarray(rewards, np.float64), next_contexts, has_next)


def learn(model: ValueModel, contexts, actions, rewards) -> np.ndarray:
    """One learner step on a batch with unit weights; returns its TD errors."""
    delta, td = compute_deltas(model.snapshot(), transitions(contexts, actions, rewards), np.ones(len(actions)), 0.0)
    model.apply_deltas(delta)
    return td


def snapshot(theta, pooled, *, margin=0.0, open_actions=None, seen=100.0, default_action=0, epsilon=0.0,
             tau=0.1, preferred=None) -> ValueSnapshot:
    """A snapshot whose pooled choice is the best pooled row (as if its advantage were significant),
    every gate open unless `open_actions` says otherwise."""
    theta = np.asarray(theta, np.float64)
    pooled = np.asarray(pooled, np.float64)
    if preferred is None:
        preferred = tuple(int(a) for a in np.argsort(-pooled, kind="stable") if pooled[a] > pooled[default_action])
    if open_actions is None:
        open_actions = tuple(range(len(theta)))
    return ValueSnapshot(1, theta, pooled, np.broadcast_to(seen, len(theta)).astype(float), preferred,
                         default_action, margin, open_actions, epsilon, tau)


def test_without_data_q_is_zero_and_the_default_action_is_served():
    model = make_model(n_actions=4, default_action=2, explore_max=0.1)
    s = model.snapshot()
    x = np.random.default_rng(0).normal(size=(5, 2))
    np.testing.assert_array_equal(s.values(x), np.zeros((5, 4)))
    np.testing.assert_array_equal(s.greedy_actions(x), [2] * 5)
    assert not s.gate_open and s.pooled_action() == 2
    # no feedback yet counts as all clicks: the full exploration rate, spread uniformly by Q = 0
    np.testing.assert_allclose(s.probabilities(x), np.tile(0.9 * np.eye(4)[2] + 0.1 / 4, (5, 1)))


@pytest.mark.parametrize("bad", [dict(n_actions=0), dict(prior_count=-1.0), dict(lr=0.0), dict(lr=1.5),
                                 dict(tau=0.0), dict(margin=-0.1), dict(explore_max=1.5),
                                 dict(default_action=3), dict(bins=1), dict(bins=-2),
                                 dict(gate_groups=[0, 1]), dict(gate_groups=[0.5, 1, 1])])
def test_invalid_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        make_model(**bad)


def test_ridge_without_prior_recovers_a_linear_reward_per_action():
    rng = np.random.default_rng(1)
    theta = np.array([[0.2, 0.5, -0.3], [0.6, -0.1, 0.0], [0.4, 0.0, 0.8]])  # intercept, two slopes
    x = rng.normal(size=(30_000, 2))
    a = rng.integers(0, 3, len(x))
    r = (theta[a] * np.hstack([np.ones((len(x), 1)), x])).sum(axis=1) + rng.normal(0, 0.1, len(x))
    model = make_model(prior_count=1e-6)
    for chunk in np.array_split(np.arange(len(x)), 10):  # statistics add up over learner steps
        learn(model, x[chunk], a[chunk], r[chunk])
    np.testing.assert_allclose(model.snapshot().theta, theta, atol=0.01)


def test_a_huge_prior_shrinks_every_slope_to_zero_and_q_to_the_pooled_mean():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 2))
    a = rng.integers(0, 3, len(x))
    r = np.array([0.2, 0.6, 0.4])[a] + np.array([1.0, -1.0, 0.5])[a] * x[:, 0]  # strong slopes in the data
    model = make_model(prior_count=1e12)
    learn(model, x, a, r)
    s = model.snapshot()
    means = [r[a == k].mean() for k in range(3)]
    np.testing.assert_allclose(s.pooled, means, rtol=1e-12)
    np.testing.assert_allclose(s.theta[:, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(s.values(rng.normal(size=(10, 2)) * 5), np.tile(means, (10, 1)), atol=1e-5)


def test_standardisation_makes_the_fit_invariant_to_rescaling_a_feature():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 2))  # ~20 samples per action: the prior matters
    a = rng.integers(0, 3, len(x))
    r = 0.5 + 0.3 * x[:, 0] * (a == 1) - 0.2 * x[:, 1] * (a == 2) + rng.normal(0, 0.1, len(x))
    scale = np.array([1000.0, 1.0])
    raw, rescaled, least_squares = make_model(prior_count=50.0), make_model(prior_count=50.0), make_model()
    learn(raw, x, a, r)
    learn(rescaled, x * scale, a, r)
    learn(least_squares, x, a, r)
    test = rng.normal(size=(20, 2))
    q = raw.snapshot().values(test)
    np.testing.assert_allclose(rescaled.snapshot().values(test * scale), q, rtol=1e-7, atol=1e-9)
    # The prior does shrink this fit, so a penalty in raw units would have moved the rescaled one.
    assert np.abs(least_squares.snapshot().values(test) - q).max() > 0.05


def test_the_horizon_caps_each_actions_sampled_weight_and_follows_a_change():
    model = make_model(n_actions=2, n_features=1, lr=0.01)  # horizon 1 / lr = 100

    def weights() -> np.ndarray:  # per action, summed over the cross-fitting folds
        return model.state_dict()["gram"][:, :, 0, 0].sum(axis=0)

    x = np.linspace(-1, 1, 550)[:, None]  # spread over every fold
    a = np.r_[np.zeros(500, int), np.ones(50, int)]
    learn(model, x, a, np.zeros(550))
    np.testing.assert_allclose(weights(), [100.0, 50.0])
    for _ in range(30):  # action 0's reward changes from 0 to 1: the old evidence fades
        learn(model, x[:10], np.zeros(10, int), np.ones(10))
    assert weights()[0] == pytest.approx(100.0)
    assert model.snapshot().pooled[0] == pytest.approx(1 - (100 / 110) ** 30)


def test_the_model_leaves_the_pooled_action_only_beyond_the_margin():
    # Q(x, 0) = 0.5, Q(x, 1) = x; the pooled row prefers 0
    theta, pooled = [[0.5, 0.0], [0.0, 1.0]], [0.5, 0.4]
    x = np.array([[0.3], [0.55], [0.65], [0.9]])  # advantages of 1 over 0: -0.2, 0.05, 0.15, 0.4
    np.testing.assert_array_equal(snapshot(theta, pooled, margin=0.1).model_actions(x), [0, 0, 1, 1])
    np.testing.assert_array_equal(snapshot(theta, pooled, margin=0.0).model_actions(x), [0, 1, 1, 1])
    np.testing.assert_array_equal(snapshot(theta, pooled, margin=0.1).greedy_actions(x), [0, 0, 1, 1])
    closed = snapshot(theta, pooled, margin=0.1, open_actions=())
    np.testing.assert_array_equal(closed.greedy_actions(x), [0, 0, 0, 0])


def observed(advantage: float, queries: int, seed: int = 0) -> ValueModel:
    """Action 0 earns `advantage` more than the default action 1 on average, with noise 0.2 per query."""
    model = make_model(n_actions=3, n_features=1, default_action=1)
    rng = np.random.default_rng(seed)
    for x in rng.normal(size=queries):
        base = rng.normal(0.5, 0.2)
        model.observe([x], 1, [base + advantage + rng.normal(0, 0.2), base, base - 0.3], base, 1.0)
    model.refresh()
    return model


def test_the_pooled_choice_leaves_the_default_only_for_a_significantly_better_action():
    assert observed(0.1, MIN_SAMPLES - 1).snapshot().pooled_action() == 1  # too little evidence
    assert observed(0.1, 300).snapshot().pooled_action() == 0
    assert observed(0.1, 300).snapshot().preferred == (0,)  # action 2 is worse, never preferred
    # a true advantage of 0 is called significant in well under 5% of runs (Bonferroni over 2)
    moved = sum(observed(0.0, 300, seed).snapshot().pooled_action() != 1 for seed in range(100))
    assert moved <= 6


@pytest.mark.parametrize("groups, preferred", [(None, ()), ((0, 1, 1, 1, 1, 1, 1), (0,))])
def test_the_error_budget_is_split_between_the_gate_groups_first(groups, preferred):
    """Action 0's advantage sits 2.2 standard errors above 0: short of Bonferroni over the six
    candidates (z 2.39), past the half of the budget a group of its own gets (z 1.96)."""
    model = make_model(n_actions=7, n_features=1, default_action=3, gate_groups=groups)
    for k in range(100):
        rewards = np.full(7, 0.5)
        rewards[0] += 0.022 + 0.1 * (-1) ** k
        model.observe([k / 100], 3, rewards.tolist(), 0.5, 1.0)
    assert model.refresh().preferred == preferred


def feature_decides(x: np.ndarray, flipped: bool = False) -> np.ndarray:
    """Every action's reward, (B, 2): 0 always earns 0.5, 1 earns 0.45 + 0.8 x (0.45 - 0.8 x if flipped)."""
    slope = -0.8 if flipped else 0.8
    return np.stack([np.full(len(x), 0.5), 0.45 + slope * x[:, 0]], axis=1)


def trained_on(flipped: bool, x: np.ndarray | None = None) -> ValueModel:
    """Both actions learned on distinct contexts in [-1, 1] (every fold) where x decides the better one."""
    model = make_model(n_actions=2, n_features=1, margin=0.005)
    x = np.linspace(-1, 1, 401)[:, None] if x is None else x
    rewards = feature_decides(x, flipped)
    for action in (0, 1):
        learn(model, x, np.full(len(x), action), rewards[:, action])
    return model


def fresh_contexts(n: int, seed: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 1))


def test_the_gate_stays_closed_below_min_samples_and_opens_when_the_model_is_better():
    model = trained_on(flipped=False)
    np.testing.assert_array_equal(model.snapshot().model_actions([[0.5], [-0.5]]), [1, 0])
    uplifts = []
    for x, rewards in zip(fresh_contexts(200), feature_decides(fresh_contexts(200))):
        model.observe(x, 0, rewards.tolist(), float(rewards[0]), 1.0)
        s = model.refresh()
        chosen = 1 if rewards[1] - rewards[0] > 0.005 else 0  # what the model (exact here) picks
        uplifts.append(rewards[chosen] - rewards[0])
        deviations = np.count_nonzero(uplifts)
        gate = model.gates()[1]
        assert gate["deviations"] == deviations and gate["mean"] == pytest.approx(np.mean(uplifts))
        # closed, without a bound, until MIN_SAMPLES queries where the model chose otherwise; then open
        assert (gate["lower_95"] is not None) == (deviations >= MIN_SAMPLES) == s.gate_open
    assert s.gate_open and gate["lower_95"] > 0
    np.testing.assert_array_equal(s.greedy_actions([[0.5], [-0.5]]), [1, 0])


def test_the_gate_stays_closed_when_the_models_choices_are_worse_on_fresh_data():
    model = trained_on(flipped=True)  # learned that 1 pays where x < 0; fresh data says x > 0
    np.testing.assert_array_equal(model.snapshot().model_actions([[0.5], [-0.5]]), [0, 1])
    x = fresh_contexts(300)
    for context, rewards in zip(x, feature_decides(x)):
        model.observe(context, 0, rewards.tolist(), float(rewards[0]), 1.0)
    s = model.refresh()
    gate = model.gates()[1]
    assert gate["deviations"] >= MIN_SAMPLES and gate["mean"] < 0 and gate["lower_95"] < 0
    assert not s.gate_open
    np.testing.assert_array_equal(s.greedy_actions([[0.5], [-0.5]]), [0, 0])


def test_each_action_has_its_own_gate_so_a_noisy_twin_cannot_hide_the_action_that_pays():
    # 0 earns 0.5; 1 pays where x > 0.07 (as in feature_decides); 2 is 0 plus noise, a near-equal twin
    rng = np.random.default_rng(4)

    def rewards_of(x: np.ndarray) -> np.ndarray:
        return np.column_stack([feature_decides(x), 0.5 + rng.normal(0, 0.1, len(x))])

    model = make_model(n_actions=3, n_features=1, margin=0.005)
    x = np.linspace(-1, 1, 401)[:, None]
    rewards = rewards_of(x)
    for action in range(3):
        learn(model, x, np.full(len(x), action), rewards[:, action])
    fresh = fresh_contexts(400)
    for context, r in zip(fresh, rewards_of(fresh)):
        model.observe(context, 0, r.tolist(), float(r[0]), 1.0)
    s = model.refresh()
    gates = model.gates()
    assert gates[2]["deviations"] >= MIN_SAMPLES  # the twin looked better on many queries ...
    assert gates[2]["lower_95"] < 0 < gates[1]["lower_95"]  # ... and earned nothing there
    assert s.open_actions == (1,)
    served = s.greedy_actions(fresh_contexts(200, seed=7))
    assert 2 not in served and 1 in served


def test_the_gate_keeps_the_last_horizon_of_distinct_queries_and_its_sums_survive_a_round_trip():
    model = trained_on(flipped=False)
    x = fresh_contexts(GATE_HORIZON + 50)
    for context, rewards in zip(x, feature_decides(x)):
        model.observe(context, 0, rewards.tolist(), float(rewards[0]), 1.0)
    for context, rewards in zip(x[-20:], feature_decides(x[-20:])):  # repeats replace their own judgement
        model.observe(context, 0, rewards.tolist(), float(rewards[0]), 1.0)
    gate = model.gates()[1]
    assert gate["n"] == GATE_HORIZON and gate["deviations"] >= MIN_SAMPLES
    again = make_model(n_actions=2, n_features=1, margin=0.005)
    again.load_state_dict(model.state_dict())  # its sums are recomputed from the stored judgements
    for ours, theirs in zip(model.gates(), again.gates(), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == (None if theirs[key] is None else pytest.approx(theirs[key], rel=1e-9, abs=1e-12))


def test_each_query_is_judged_by_the_model_fitted_without_its_fold():
    pool = np.linspace(-1, 1, 2001)[:, None]
    folds = np.array([fold_of(x) for x in pool])
    model = trained_on(flipped=False, x=pool[folds == 0][::2])  # learned from fold 0 alone
    assert model.snapshot().model_actions([[0.9]])[0] == 1  # the served model is sure
    unseen_fold_0 = pool[folds == 0][1::2]  # fresh queries, but of the fold the judges left out
    for x, rewards in zip(unseen_fold_0, feature_decides(unseen_fold_0)):
        model.observe(x, 0, rewards.tolist(), float(rewards[0]), 1.0)
    assert model.gates()[1]["deviations"] == 0  # judged by a model that saw no data: the pooled row
    other_folds = pool[folds == 1]
    for x, rewards in zip(other_folds, feature_decides(other_folds)):
        model.observe(x, 0, rewards.tolist(), float(rewards[0]), 1.0)
    assert model.gates()[1]["deviations"] > MIN_SAMPLES and model.gates()[1]["mean"] > 0


def test_a_repeated_query_is_gate_evidence_once():
    model = trained_on(flipped=False)
    for _ in range(100):
        model.observe([0.9], 0, [0.5, 1.17], 0.5, 1.0)
    gate = model.gates()[1]
    assert (gate["n"], gate["deviations"]) == (1, 1) and gate["mean"] == pytest.approx(0.67)
    np.testing.assert_array_equal(model.refresh().seen, [100, 100])  # but every experience counts


def test_a_repeated_query_is_judged_again_by_the_current_model_and_still_counts_once():
    model = make_model(n_actions=2, n_features=1, margin=0.005)  # nothing learned: the pooled row
    x = fresh_contexts(60)
    for context, rewards in zip(x, feature_decides(x)):
        model.observe(context, 0, rewards.tolist(), float(rewards[0]), 1.0)
    assert model.gates()[1]["deviations"] == 0  # an untrained model never deviates
    pool = np.linspace(-1, 1, 401)[:, None]
    for action in (0, 1):
        learn(model, pool, np.full(len(pool), action), feature_decides(pool)[:, action])
    for context, rewards in zip(x, feature_decides(x)):  # the same queries come back
        model.observe(context, 0, rewards.tolist(), float(rewards[0]), 1.0)
    gate = model.gates()[1]
    assert gate["n"] == 60  # each query once ...
    assert gate["deviations"] == np.count_nonzero(x[:, 0] > 0.07)  # ... judged by the model as it is now
    assert gate["mean"] > 0


def test_click_feedback_scores_the_model_by_inverse_propensity_and_counts_the_served_action():
    model = trained_on(flipped=False)  # at x > 0.07 the model picks 1, the pooled row 0
    model.observe([0.9], 1, None, 0.8, 0.25)
    assert model.gates()[1]["mean"] == pytest.approx(0.8 / 0.25)
    model.observe([0.8], 0, None, 0.5, 0.5)
    assert model.gates()[1]["mean"] == pytest.approx((3.2 - 1.0) / 2)
    np.testing.assert_array_equal(model.refresh().seen, [1, 1])


@pytest.mark.parametrize(("graded", "clicks", "expected"), [(0, 0, 0.2), (4, 0, 0.0), (3, 1, 0.05), (0, 5, 0.2)])
def test_epsilon_is_explore_max_times_the_share_of_click_feedback(graded, clicks, expected):
    model = make_model(n_actions=2, n_features=1, explore_max=0.2)
    for _ in range(graded):
        model.observe([0.0], 0, [0.5, 0.1], 0.5, 1.0)
    for _ in range(clicks):
        model.observe([0.0], 0, None, 0.5, 1.0)
    assert model.epsilon() == pytest.approx(expected)
    assert model.refresh().epsilon == pytest.approx(expected)


def test_probabilities_mix_greedy_with_epsilon_softmax_and_sum_to_one():
    rng = np.random.default_rng(4)
    theta = rng.normal(size=(5, 3))
    x = rng.normal(size=(50, 2))
    explored = snapshot(theta, np.zeros(5), epsilon=0.3, tau=0.5)
    probs = explored.probabilities(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs > 0).all()
    greedy = np.eye(5)[explored.greedy_actions(x)]
    np.testing.assert_allclose(probs, 0.7 * greedy + 0.3 * policy_from_q(explored.values(x), 0.5))
    exact = snapshot(theta, np.zeros(5), epsilon=0.0, tau=0.5)
    np.testing.assert_array_equal(exact.probabilities(x), np.eye(5)[exact.greedy_actions(x)])


def test_policy_from_q_is_a_stable_softmax():
    q = np.array([[1000.0, 1000.0 + np.log(3) * 0.5]])
    np.testing.assert_allclose(policy_from_q(q, 0.5), [[0.25, 0.75]])


def test_gamma_adds_the_soft_value_of_the_next_context_only_where_there_is_one():
    s = snapshot([[0.1, 0.5], [0.3, -0.2]], [0.0, 0.0], tau=0.5)
    batch = transitions([[1.0], [2.0]], [0, 1], [0.3, 0.4], next_contexts=[[0.5], [3.0]], has_next=[True, False])
    q_next = np.array([0.1 + 0.5 * 0.5, 0.3 - 0.2 * 0.5])
    v_next = 0.5 * np.log(np.exp(q_next / 0.5).sum())
    q = np.array([0.1 + 0.5 * 1.0, 0.3 - 0.2 * 2.0])
    _, td0 = compute_deltas(s, batch, np.ones(2), 0.0)
    delta, td = compute_deltas(s, batch, np.ones(2), 0.9)
    np.testing.assert_allclose(td0, [0.3, 0.4] - q)
    np.testing.assert_allclose(td, [0.3 + 0.9 * v_next, 0.4] - q)
    np.testing.assert_allclose(delta.target.sum(axis=0)[:, 0], [0.3 + 0.9 * v_next, 0.4])  # sum of w * y per action


def test_deltas_are_the_weighted_sufficient_statistics_of_the_batch_per_fold():
    s = make_model(n_actions=2, n_features=1).snapshot()
    batch = transitions([[1.0], [2.0], [3.0]], [0, 1, 1], [0.5, 1.0, 2.0], folds=[4, 2, 2])
    delta, _ = compute_deltas(s, batch, [0.5, 1.0, 0.25], 0.0)
    assert delta.gram.shape == (FOLDS, 2, 2, 2) and delta.target.shape == (FOLDS, 2, 2)
    np.testing.assert_allclose(delta.gram[4, 0], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(delta.gram[2, 1], [[1.25, 2.75], [2.75, 6.25]])
    np.testing.assert_allclose(delta.target[4, 0], [0.25, 0.25])
    np.testing.assert_allclose(delta.target[2, 1], [1.5, 3.5])
    assert np.abs(delta.gram).sum() == pytest.approx(0.5 * 4 + 1.25 + 2 * 2.75 + 6.25)  # nothing elsewhere
    assert delta.base_version == s.version


@pytest.mark.parametrize("actions", [[0, 3], [-1, 0]])
def test_compute_deltas_rejects_out_of_range_actions(actions):
    s = make_model(n_actions=3, n_features=1).snapshot()
    with pytest.raises(ValueError, match="actions must be in"):
        compute_deltas(s, transitions([[0.0], [1.0]], actions, [0.0, 0.0]), np.ones(2), 0.0)


def test_applying_a_delta_bumps_the_version_and_forget_starts_afresh_at_a_new_one():
    model = make_model()
    version = model.version
    assert learn(model, [[1.0, 2.0]], [1], [0.7]) == pytest.approx([0.7])
    assert model.version == model.snapshot().version == version + 1
    assert model.snapshot().pooled[1] == pytest.approx(0.7)
    model.forget()
    assert model.version == version + 2
    np.testing.assert_array_equal(model.snapshot().values([[1.0, 2.0]]), [[0.0, 0.0, 0.0]])


def test_snapshots_are_read_only():
    s = make_model().snapshot()
    for array in (s.theta, s.pooled, s.seen):
        with pytest.raises(ValueError):
            array[0] = 1.0


def trained_model(**changes) -> ValueModel:
    rng = np.random.default_rng(5)
    model = make_model(prior_count=5.0, lr=0.001, explore_max=0.1, **changes)
    x = rng.normal(size=(200, 2))
    learn(model, x, rng.integers(0, 3, 200), x[:, 0] + rng.normal(0, 0.1, 200))
    for context in x[:40]:
        model.observe(context, 1, [0.1, 0.5, float(context[0])], 0.5, 0.4)
    model.observe(x[0], 2, None, 0.3, 0.5)
    model.refresh()
    return model


def test_state_dict_round_trip_restores_the_same_snapshot():
    model = trained_model()
    restored = make_model(prior_count=5.0, lr=0.001, explore_max=0.1)
    restored.load_state_dict(pickle.loads(pickle.dumps(model.state_dict())))
    a, b = model.snapshot(), restored.snapshot()
    assert (a.version, a.gate_open, a.epsilon, a.default_action) == (b.version, b.gate_open, b.epsilon, b.default_action)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.pooled, b.pooled)
    np.testing.assert_array_equal(a.seen, b.seen)
    assert model.gates() == restored.gates()
    assert a.epsilon > 0 and a.seen.min() > 0  # the state was not trivial


def test_loading_keeps_the_configured_hyperparameters():
    restored = make_model(prior_count=5.0, lr=0.001, explore_max=0.1, margin=0.3)
    restored.load_state_dict(trained_model().state_dict())
    assert restored.snapshot().margin == 0.3


@pytest.mark.parametrize(("shape", "change"), [
    ((3, 2), {"format": 3}),
    ((4, 2), {}),  # another action count
    ((3, 3), {}),  # another feature count
])
def test_load_refuses_another_layout_or_shape_and_changes_nothing(shape, change):
    target = make_model(*shape)
    learn(target, np.ones((4, shape[1])), [0, 1, 2, 0], [0.1, 0.2, 0.3, 0.4])
    before = target.state_dict()
    with pytest.raises(ValueError):
        target.load_state_dict({**trained_model().state_dict(), **change})
    after = target.state_dict()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_a_disallowed_action_is_never_chosen_but_the_default_always_may_be():
    # Q(x, .) = [0.1, 0.2, 0.9]: action 2 would win everywhere
    s = snapshot([[0.1, 0.0], [0.2, 0.0], [0.9, 0.0]], [0.1, 0.2, 0.9], epsilon=0.3, default_action=0)
    x = np.zeros((4, 1))
    allowed = np.array([False, True, False])
    np.testing.assert_array_equal(s.greedy_actions(x), [2] * 4)
    np.testing.assert_array_equal(s.greedy_actions(x, allowed), [1] * 4)
    probs = s.probabilities(x, allowed)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(probs[:, 2], 0.0)
    assert (probs[:, 0] > 0).all()  # the default stays allowed
    assert s.pooled_action(np.array([False, False, False])) == 0


# --- context bins -------------------------------------------------------------------------------


def middle_pays(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One feature; action 1 beats action 0 by 0.2 only for contexts in the middle third."""
    x = rng.uniform(0, 3, (n, 1))
    a = rng.integers(0, 2, n)
    middle = (x[:, 0] > 1) & (x[:, 0] < 2)
    return x, a, np.where(a == 1, np.where(middle, 0.7, 0.3), 0.5)


def observe_distinct(model: ValueModel, count: int, rng: np.random.Generator) -> None:
    for x in rng.uniform(0, 3, (count, 1)):
        model.observe(x, 0, [0.5, 0.5], 0.5, 1.0)


def test_bins_learn_a_middle_band_that_a_line_cannot():
    rng = np.random.default_rng(0)
    probes = np.array([[0.5], [1.5], [2.5]])
    chosen = {}
    for bins in (0, 3):
        model = make_model(n_actions=2, n_features=1, prior_count=1e-3, bins=bins)
        if bins:
            observe_distinct(model, BIN_SAMPLE, rng)
        learn(model, *middle_pays(rng, 3000))
        chosen[bins] = model.snapshot().model_actions(probes).tolist()
    assert chosen[3] == [0, 1, 0]
    assert chosen[0] != [0, 1, 0]  # a line through the band picks one side


def test_edges_are_learned_from_the_first_distinct_contexts_and_earlier_deltas_are_refused():
    rng = np.random.default_rng(1)
    model = make_model(n_actions=2, n_features=1, bins=3)
    assert not model.snapshot().bins.learned
    early, _ = compute_deltas(model.snapshot(), transitions(*middle_pays(rng, 50)), np.ones(50), 0.0)
    model.apply_deltas(early)  # before the edges: statistics of the intercept, accepted
    for _ in range(3):  # a repeated context counts once
        model.observe([1.0], 0, [0.5, 0.5], 0.5, 1.0)
    observe_distinct(model, BIN_SAMPLE - 2, rng)
    assert not model.snapshot().bins.learned
    stale, _ = compute_deltas(model.snapshot(), transitions(*middle_pays(rng, 50)), np.ones(50), 0.0)
    observe_distinct(model, 1, rng)
    snapshot = model.snapshot()
    assert snapshot.bins.learned and snapshot.bins.edges.shape == (1, 2)
    np.testing.assert_array_equal(snapshot.pooled, [0.0, 0.0])  # what the unset edges taught is gone
    assert not model.accepts(stale)
    with pytest.raises(ValueError, match="edges"):
        model.apply_deltas(stale)
    learn(model, *middle_pays(rng, 50))
    assert model.snapshot().seen.sum() > 0 and model.snapshot().pooled.any()


def test_bins_survive_a_state_dict_round_trip_and_a_raw_state_is_refused():
    rng = np.random.default_rng(2)
    model = make_model(n_actions=2, n_features=1, bins=3)
    observe_distinct(model, BIN_SAMPLE + 5, rng)
    learn(model, *middle_pays(rng, 500))
    state = pickle.loads(pickle.dumps(model.state_dict()))
    restored = make_model(n_actions=2, n_features=1, bins=3)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.snapshot().bins.edges, model.snapshot().bins.edges)
    x = rng.uniform(0, 3, (20, 1))
    np.testing.assert_allclose(restored.snapshot().values(x), model.snapshot().values(x))
    with pytest.raises(ValueError, match="bins"):
        make_model(n_actions=2, n_features=2, bins=0).load_state_dict(state)  # same statistics shape, no bins


# --- paired statistics --------------------------------------------------------------------------


def test_a_row_with_its_searchs_rewards_teaches_every_rewarded_action_with_a_share_of_its_weight():
    model = make_model(n_actions=3, n_features=1)
    batch = transitions([[1.0], [2.0]], [0, 2], [0.5, 0.9])._replace(
        search_rewards=np.array([[0.5, 0.7, np.nan], [np.nan, np.nan, np.nan]]))
    delta, td = compute_deltas(model.snapshot(), batch, np.array([1.0, 0.5]), 0.0)
    np.testing.assert_allclose(td, [0.5, 0.9])  # each row's own action
    gram, target = delta.gram.sum(axis=0), delta.target.sum(axis=0)  # over folds
    phi = np.array([[1.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(gram[0], 0.5 * np.outer(phi[0], phi[0]))  # row 0: weight 1 over 2 actions
    np.testing.assert_allclose(target[1], 0.5 * 0.7 * phi[0])
    np.testing.assert_allclose(gram[2], 0.5 * np.outer(phi[1], phi[1]))  # row 1 (a click): its own action
    np.testing.assert_allclose(target[2], 0.5 * 0.9 * phi[1])


@pytest.mark.parametrize("paired", [True, False])
def test_paired_rows_fit_the_difference_whatever_queries_each_action_drew(paired):
    # 40 searches of rising difficulty; action 1 always earns 0.1 more. The replay happened to draw
    # action 0's rows from the easy half and action 1's from the hard half.
    difficulty = np.linspace(0, 1, 40)
    x = np.where(np.arange(40) % 2, 1.0, -1.0)[:, None]
    rewards = np.column_stack([difficulty, difficulty + 0.1])
    drawn = (np.arange(40) >= 20).astype(int)
    batch = transitions(x, drawn, rewards[np.arange(40), drawn])
    if paired:
        batch = batch._replace(search_rewards=rewards)
    model = make_model(n_actions=2, n_features=1)
    delta, _ = compute_deltas(model.snapshot(), batch, np.ones(40), 0.0)
    model.apply_deltas(delta)
    q = model.snapshot().values([[1.0], [-1.0]])
    difference = q[:, 1] - q[:, 0]
    if paired:
        np.testing.assert_allclose(difference, [0.1, 0.1], atol=1e-9)
    else:  # each action's fit keeps the difficulty of the queries it drew
        assert (difference > 0.4).all()
