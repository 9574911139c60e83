"""Context features as quantile steps: phi(x) = [1, 1[x_j > e_jb] for each feature j and edge b].

A value model linear in the raw context (`learners.context`) extrapolates along skewed features
(idf, score ratios) and its fit follows the few extreme queries: fitted on SciFact's training
claims, it lost reward on the test claims while doing well on held-out training claims. Steps at
each feature's quantiles (the 1/k, ..., (k-1)/k quantiles of the contexts seen) make the model
additive and piecewise constant: each feature may move a value up or down by "low / middle /
high" without a scale, which carried from training to test claims (bench/RESULTS.md, "Context
transfer"). It stays linear in phi, so ridge statistics still add up across learners.

Edges are learned once from the first contexts a model sees and then fixed: statistics collected
under other edges would mean something else. Until then every step is 0 (edges at +inf), so the
model is its intercept, the pooled value of each action.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class ContextBins:
    """Step edges per feature; shape (d, k - 1). +inf edges: not learned yet (every step is 0)."""

    edges: np.ndarray

    @classmethod
    def unset(cls, n_features: int, bins: int) -> ContextBins:
        """Edges not learned yet: phi(x) is [1, 0, ..., 0] for every x."""
        if bins < 2:
            raise ValueError(f"need at least 2 bins per feature, got {bins}")
        return cls(np.full((n_features, bins - 1), np.inf))

    @classmethod
    def from_contexts(cls, contexts: ArrayLike, bins: int) -> ContextBins:
        """Edges at each feature's (1/k, ..., (k-1)/k) quantiles of `contexts` (N, d)."""
        x = np.atleast_2d(np.asarray(contexts, np.float64))
        if bins < 2 or len(x) == 0:
            raise ValueError(f"need at least 2 bins and a context, got {bins} bins and {len(x)} contexts")
        edges = np.quantile(x, np.arange(1, bins) / bins, axis=0).T  # (d, k - 1)
        return cls(np.ascontiguousarray(edges))

    @property
    def learned(self) -> bool:
        return bool(np.isfinite(self.edges).all())

    @property
    def dim(self) -> int:
        """Length of phi(x): the intercept and one step per edge."""
        return 1 + self.edges.size

    def design(self, contexts: ArrayLike) -> np.ndarray:
        """phi(x) per row; (B, d) -> (B, 1 + d (k - 1))."""
        x = np.atleast_2d(np.asarray(contexts, np.float64))
        steps = (x[:, :, None] > self.edges[None]).reshape(len(x), -1)
        return np.hstack([np.ones((len(x), 1)), steps.astype(np.float64)])

    def names(self, features: Sequence[str]) -> list[str]:
        """A readable name per entry of phi: `intercept`, then `feature>q1`, `feature>q2`, ..."""
        per_feature = self.edges.shape[1]
        return ["intercept", *(f"{name}>q{b + 1}" for name in features for b in range(per_feature))]
