"""Off-policy evaluation: what a target policy would earn, estimated from searches logged under another.

Logged row i: context x_i, action a_i taken with probability mu_i = mu(a_i | x_i) (the propensity the
behaviour policy logged with it), reward r_i. The target policy gives pi(. | x_i), shape (n, A).

    w_i   = pi(a_i | x_i) / mu_i                                           importance weight
    IPS   = mean_i  w_i r_i                            unbiased wherever mu > 0 where pi > 0
    SNIPS = sum_i w_i r_i / sum_i w_i                  self-normalised: slightly biased, steadier
    DR    = mean_i [ sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]   (Dudik et al., 2011)
    ESS   = (sum_i w_i)^2 / sum_i w_i^2                the on-policy rows the estimate is worth

q is a reward model, cross-fitted: the model that scores row i was fitted without row i's fold
(folds by the context's hash, so a repeated query stays in one fold), so its errors are not fitted
to the noise the correction term measures. A row without a usable propensity (missing, not finite,
not in (0, 1]) cannot be reweighted: it is refused and counted, never guessed. Intervals are
percentile bootstraps over rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

from learners.value_model import FOLDS, Transitions, ValueModel, compute_deltas, fold_of


@dataclasses.dataclass(frozen=True)
class LoggedSearches:
    """n logged rows; build with `LoggedSearches.usable` to drop and count unusable propensities."""

    contexts: np.ndarray  # (n, d)
    actions: np.ndarray  # (n,) ints in [0, A)
    propensities: np.ndarray  # (n,) mu(a_i | x_i) in (0, 1]
    rewards: np.ndarray  # (n,)
    refused: int = 0  # rows dropped for a missing or impossible propensity

    @classmethod
    def usable(cls, contexts: ArrayLike, actions: ArrayLike, propensities: ArrayLike,
               rewards: ArrayLike) -> LoggedSearches:
        """The rows whose propensity is in (0, 1] and whose reward is finite; the others are counted."""
        mu = np.array([np.nan if p is None else p for p in np.asarray(propensities, object)], np.float64)
        r = np.asarray(rewards, np.float64)
        keep = np.isfinite(mu) & (mu > 0) & (mu <= 1) & np.isfinite(r)
        return cls(np.atleast_2d(np.asarray(contexts, np.float64))[keep], np.asarray(actions, np.int64)[keep],
                   mu[keep], r[keep], int((~keep).sum()))

    def __len__(self) -> int:
        return len(self.actions)


@dataclasses.dataclass(frozen=True)
class Estimate:
    estimator: str  # ips, snips or dr
    value: float
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th
    effective_sample_size: float
    rows: int
    refused: int

    def __str__(self) -> str:
        return (f"{self.estimator}: {self.value:.4f} [{self.low:.4f}, {self.high:.4f}] "
                f"(ESS {self.effective_sample_size:.0f} of {self.rows} rows, {self.refused} refused)")


def cross_fitted_rewards(logs: LoggedSearches, n_actions: int, prior_count: float = 50.0) -> np.ndarray:
    """q(x_i, a) for every row and action, each row scored by ridge models fitted without its fold; (n, A)."""
    folds = np.array([fold_of(x) for x in logs.contexts], np.int64)
    q = np.zeros((len(logs), n_actions))
    for fold in range(FOLDS):
        held_out, train = folds == fold, folds != fold
        if not held_out.any():
            continue
        model = ValueModel(n_actions, logs.contexts.shape[1], prior_count=prior_count, lr=1e-12, tau=1.0,
                           margin=0.0, explore_max=0.0, default_action=0)
        batch = Transitions(logs.contexts[train], folds[train], logs.actions[train], logs.rewards[train],
                            logs.contexts[train], np.zeros(int(train.sum()), bool))
        delta, _ = compute_deltas(model.snapshot(), batch, np.ones(int(train.sum())), 0.0)
        model.apply_deltas(delta)
        q[held_out] = model.snapshot().values(logs.contexts[held_out])
    return q


def importance_weights(logs: LoggedSearches, target: np.ndarray) -> np.ndarray:
    """w_i = pi(a_i | x_i) / mu_i; (n,)."""
    return np.asarray(target, np.float64)[np.arange(len(logs)), logs.actions] / logs.propensities


def effective_sample_size(weights: np.ndarray) -> float:
    return float(weights.sum() ** 2 / max(float((weights * weights).sum()), 1e-300))


def dr_terms(logs: LoggedSearches, target: np.ndarray, rewards_model: np.ndarray) -> np.ndarray:
    """Per row, sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)): DR is their mean; (n,)."""
    target, q = np.asarray(target, np.float64), np.asarray(rewards_model, np.float64)
    rows = np.arange(len(logs))
    return (target * q).sum(axis=1) + importance_weights(logs, target) * (logs.rewards - q[rows, logs.actions])


def bootstrap_rows(logs: LoggedSearches, resamples: int, seed: int) -> np.ndarray:
    """Row indices of `resamples` bootstrap resamples of the logs, shape (resamples, n): share them
    between estimates so their intervals are paired."""
    return np.random.default_rng(seed).integers(0, len(logs), size=(resamples, len(logs)))


def estimate(logs: LoggedSearches, name: str, terms: np.ndarray, draws: np.ndarray, ess: float) -> Estimate:
    """The mean of per-row `terms` with a percentile interval over bootstrap `draws` (resamples, n) of rows."""
    low, high = np.percentile(terms[draws].mean(axis=1), [2.5, 97.5])
    return Estimate(name, float(terms.mean()), float(low), float(high), ess, len(logs), logs.refused)


def evaluate(logs: LoggedSearches, target: np.ndarray, rewards_model: np.ndarray | None = None,
             resamples: int = 2000, seed: int = 0) -> dict[str, Estimate]:
    """IPS, SNIPS and (given q, shape (n, A)) DR of the target policy pi, shape (n, A), with intervals."""
    if len(logs) == 0:
        raise ValueError(f"no usable logged rows ({logs.refused} refused for missing or zero propensities)")
    w = importance_weights(logs, target)  # (n,)
    ess = effective_sample_size(w)
    draws = bootstrap_rows(logs, resamples, seed)
    ips = w * logs.rewards
    out = {"ips": estimate(logs, "ips", ips, draws, ess)}
    if rewards_model is not None:
        out["dr"] = estimate(logs, "dr", dr_terms(logs, target, rewards_model), draws, ess)
    low, high = np.percentile(ips[draws].sum(axis=1) / np.maximum(w[draws].sum(axis=1), 1e-300), [2.5, 97.5])
    out["snips"] = Estimate("snips", float(ips.sum() / max(w.sum(), 1e-300)), float(low), float(high), ess,
                            len(logs), logs.refused)
    return out
