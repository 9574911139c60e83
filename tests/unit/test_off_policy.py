import numpy as np
import pytest

from learners.off_policy import LoggedSearches, cross_fitted_rewards, evaluate

ACTIONS = 3


def mean_reward(x: np.ndarray) -> np.ndarray:
    """The simulator's truth, (n, A): action 0 earns 0.5 everywhere, 1 pays where x0 > 0, 2 where x1 > 0."""
    return np.column_stack([np.full(len(x), 0.5), 0.5 + 0.3 * x[:, 0], 0.45 + 0.25 * x[:, 1]])


def respond(rng: np.random.Generator, x: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """A user's graded reward in [0, 1]: Bernoulli around the action's mean."""
    return (rng.random(len(x)) < mean_reward(x)[np.arange(len(x)), actions]).astype(np.float64)


def logging_policy(x: np.ndarray) -> np.ndarray:
    """Mostly action 0, exploring the others (the behaviour policy; every action has mass)."""
    return np.tile([0.7, 0.15, 0.15], (len(x), 1))


def target_policy(x: np.ndarray) -> np.ndarray:
    """A different, deterministic policy: 1 where x0 > 0.2, else 2 where x1 > 0.2, else 0."""
    choice = np.where(x[:, 0] > 0.2, 1, np.where(x[:, 1] > 0.2, 2, 0))
    return np.eye(ACTIONS)[choice]


def simulate_logs(seed: int, n: int = 4000) -> LoggedSearches:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 2))
    mu = logging_policy(x)
    actions = np.array([rng.choice(ACTIONS, p=p) for p in mu])
    return LoggedSearches.usable(x, actions, mu[np.arange(n), actions], respond(rng, x, actions))


def online_value(seed: int, n: int = 200_000) -> float:
    """The target policy run on fresh traffic of the same simulator."""
    rng = np.random.default_rng(10_000 + seed)
    x = rng.uniform(-1, 1, (n, 2))
    return float(respond(rng, x, target_policy(x).argmax(axis=1)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_estimate_covers_the_value_measured_online(seed):
    logs = simulate_logs(seed)
    estimates = evaluate(logs, target_policy(logs.contexts), cross_fitted_rewards(logs, ACTIONS), seed=seed)
    truth = online_value(seed)
    for name in ("ips", "snips", "dr"):
        e = estimates[name]
        assert e.low <= truth <= e.high, (name, e, truth)
    # the reward model takes the part of the noise it can predict: DR's interval is the narrowest
    width = {name: e.high - e.low for name, e in estimates.items()}
    assert width["dr"] < width["ips"]


def test_the_behaviour_policy_evaluated_on_its_own_logs_is_the_mean_reward_with_every_row_counted():
    logs = simulate_logs(3)
    estimates = evaluate(logs, logging_policy(logs.contexts))
    assert estimates["ips"].value == pytest.approx(logs.rewards.mean())
    assert estimates["snips"].value == pytest.approx(logs.rewards.mean())
    assert estimates["ips"].effective_sample_size == pytest.approx(len(logs))
    assert "dr" not in estimates  # no reward model given


def test_a_narrow_target_is_worth_fewer_rows():
    logs = simulate_logs(4)
    ess = evaluate(logs, target_policy(logs.contexts))["ips"].effective_sample_size
    assert 0.05 * len(logs) < ess < 0.5 * len(logs)


def test_rows_without_a_usable_propensity_are_refused_and_counted():
    logs = LoggedSearches.usable([[0.0], [0.1], [0.2], [0.3], [0.4]], [0, 1, 0, 1, 0],
                                 [0.5, None, 0.0, 1.5, 0.25], [1.0, 1.0, 1.0, 1.0, 0.0])
    assert (len(logs), logs.refused) == (2, 3)
    np.testing.assert_array_equal(logs.propensities, [0.5, 0.25])
    estimate = evaluate(logs, np.tile([1.0, 0.0], (2, 1)))["ips"]
    assert (estimate.rows, estimate.refused) == (2, 3)
    assert estimate.value == pytest.approx((1.0 / 0.5 + 0.0) / 2)
    with pytest.raises(ValueError, match="3 refused"):
        evaluate(LoggedSearches.usable([[0.0]] * 3, [0, 0, 0], [None, 0.0, np.nan], [1, 1, 1]), np.ones((0, 2)))


def test_the_reward_model_never_scores_a_row_with_a_model_that_saw_it():
    # 30 features for 120 rows of pure noise: a model fitted on a row follows that row's noise
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 30))
    logs = LoggedSearches.usable(x, np.zeros(120, int), np.ones(120), rng.normal(size=120))
    design = np.hstack([np.ones((120, 1)), x])
    in_sample = design @ np.linalg.lstsq(design, logs.rewards, rcond=None)[0]
    assert np.corrcoef(in_sample, logs.rewards)[0, 1] > 0.4
    out_of_fold = cross_fitted_rewards(logs, 1, prior_count=0.0)[:, 0]
    assert np.corrcoef(out_of_fold, logs.rewards)[0, 1] < 0.2
