"""Scores of policies over a test matrix measured once: per query and action, nDCG@10 and CPU ms.

reward = quality - cost_weight * cost. Any model snapshot (the final one, or those taken while
learning) is scored offline from the same matrix, so a learning curve costs no further searches.
Intervals are paired bootstraps over queries: every policy is scored on the same queries, so the
differences between policies are resampled, not the policies' means one by one. With several
seeds, a query's rows across seeds form one cluster that is resampled whole (they share the
query's difficulty), so repeating a query does not narrow the interval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from learners.value_model import ValueSnapshot

_Z_975, _Z_80 = 1.959963984540054, 0.8416212335729143


@dataclasses.dataclass(frozen=True)
class TestMatrix:
    """Every test query under every action, and the context the policy sees for it."""

    query_ids: list[str]
    contexts: np.ndarray  # (Q, d)
    quality: np.ndarray  # (Q, A) nDCG@10
    cost: np.ndarray  # (Q, A) CPU ms of the stages after the lexical one
    dense: np.ndarray  # (A,) bool: the action runs the dense side


@dataclasses.dataclass(frozen=True)
class PolicyOutcome:
    """Per test query, what a policy earns in expectation; each array has shape (Q,)."""

    quality: np.ndarray
    cost: np.ndarray
    dense: np.ndarray  # probability that the dense side runs
    reward: np.ndarray


def outcome(matrix: TestMatrix, probabilities: np.ndarray, cost_weight: float) -> PolicyOutcome:
    """E over a ~ probabilities (Q, A) of each query's quality, cost, dense share and reward."""
    quality = (probabilities * matrix.quality).sum(axis=1)
    cost = (probabilities * matrix.cost).sum(axis=1)
    return PolicyOutcome(quality, cost, probabilities @ matrix.dense.astype(np.float64),
                         quality - cost_weight * cost)


def fixed(matrix: TestMatrix, action: int) -> np.ndarray:
    """The probabilities (Q, A) of always taking `action`."""
    return np.broadcast_to(np.eye(matrix.quality.shape[1])[action], matrix.quality.shape)


def greedy(matrix: TestMatrix, policy: ValueSnapshot) -> np.ndarray:
    """The probabilities (Q, A) of the policy without exploration."""
    return np.eye(policy.n_actions)[policy.greedy_actions(matrix.contexts)]


def served(matrix: TestMatrix, policy: ValueSnapshot) -> np.ndarray:
    """The probabilities (Q, A) of the policy as served, exploration included."""
    return policy.probabilities(matrix.contexts)


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th
    lower_95: float  # 5th: the one-sided 95% lower bound

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(values: np.ndarray, clusters: Sequence[str] | None = None, resamples: int = 4000,
                     seed: int = 0) -> Interval:
    """Bootstrap interval of the mean of `values` (e.g. per-query differences), resampling clusters.

    `clusters` names each value's query; values of one query (across seeds) are drawn together.
    """
    values = np.asarray(values, np.float64)
    if clusters is None:
        clusters = [str(i) for i in range(len(values))]
    names, index = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, lower_95, high = np.percentile(means, [2.5, 5.0, 97.5])
    return Interval(float(values.mean()), float(low), float(high), float(lower_95))


def queries_needed(differences: np.ndarray, effect: float | None = None) -> float:
    """Paired queries a two-sided 5% test needs to detect `effect` (default: the observed mean) with 80% power."""
    differences = np.asarray(differences, np.float64)
    effect = float(differences.mean()) if effect is None else effect
    if effect == 0:
        return float("inf")
    return float((_Z_975 + _Z_80) ** 2 * differences.var(ddof=1) / effect**2)
