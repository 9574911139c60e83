"""Prioritized replay split over N shards, sampled as exactly as one buffer holding them all.

Shard s is a `PrioritizedReplayBuffer` whose experiences have priorities p_i = (|delta_i| + eps)^alpha,
so its priority mass is m_s = sum_{i in s} p_i and the whole replay's is M = sum_s m_s. One buffer
draws experience i with P(i) = p_i / M. A sharded batch of B is drawn in two stages: counts
c = (c_1, ..., c_N) per shard with E[c_s] = B m_s / M, then shard s draws c_s experiences from its
own p_i / m_s. Each draw is then experience i with probability (m_s / M) (p_i / m_s) = p_i / M, the
unsharded P(i). Two splits give those expected counts:

- `multinomial_split`: c ~ Multinomial(B, m / M), the batch's draws independent of each other;
- `stratified_split`: one uniform point in each of B equal slices of [0, M) counted per shard's
  interval of cumulative mass, so |c_s - B m_s / M| < 2, as the single buffer's stratified draw.

A split whose expected counts are not B m_s / M (say B / N per shard) over-samples the experiences
of light shards; the unit tests show the chi-square test rejecting one.

Importance weights are computed against the global distribution: w_i = (N_total P(i))^-beta with
N_total the sum of the shards' sizes and P(i) = p_i / M, divided by the largest weight of the whole
batch, so they are the weights one buffer holding the same experiences would give
(`importance_weights`). A shard's own weights, normalised within its part of the batch, are
discarded. beta follows the shards' schedule (beta0 -> 1) counted in this sampler's calls.

Indices carry their shard: experience k of a batch is slot `indices[k]` of shard `shards[k]`, and
`update_priorities` routes each TD error back to that shard, which skips slots overwritten since
(insertion ids), as one buffer does. New experiences enter at their own shard's max priority.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from learners.replay import Column, PrioritizedReplayBuffer, annealed_beta, importance_weights

SplitFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
"""(masses m, shape (N,); batch size B; rng) -> counts c, shape (N,) int, summing to B."""


def multinomial_split(masses: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """c ~ Multinomial(B, m / M): shape (N,) -> (N,) int64."""
    return rng.multinomial(batch_size, masses / masses.sum())


def stratified_split(masses: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Per shard, how many of B stratified points in [0, M) fall in its mass: shape (N,) -> (N,) int64."""
    edges = np.cumsum(masses)
    points = (np.arange(batch_size) + rng.random(batch_size)) * (edges[-1] / batch_size)
    shards = np.searchsorted(edges, points, side="right")  # skips shards of mass 0
    # a point rounded up to M or past it belongs to the last shard that has mass
    np.minimum(shards, np.flatnonzero(masses)[-1], out=shards)
    return np.bincount(shards, minlength=len(masses))


class ShardedSample(NamedTuple):
    """A prioritized batch of B experiences drawn across shards, grouped by shard."""

    shards: np.ndarray  # (B,) int64 shard of each experience
    indices: np.ndarray  # (B,) int64 slot in its shard
    insertion_ids: np.ndarray  # (B,) int64, for update_priorities to skip overwritten slots
    weights: np.ndarray  # (B,) float64 importance-sampling weights against the global P(i), max 1
    columns: dict[str, np.ndarray]  # name -> (B, *shape)


class ShardedReplay:
    """N prioritized replay buffers sampled as one (module doc).

    The shards must share alpha and eps (else their priorities are not comparable) and the beta
    schedule. Experiences are added to a shard directly (`shards[s].add`).
    """

    def __init__(self, shards: Sequence[PrioritizedReplayBuffer], split: SplitFn = multinomial_split,
                 seed: int | None = None) -> None:
        if not shards:
            raise ValueError("need at least one shard")
        settings = {(s.alpha, s.eps, s.beta0, s.beta_steps) for s in shards}
        if len(settings) > 1:
            raise ValueError(f"shards must share (alpha, eps, beta0, beta_steps), got {sorted(settings)}")
        self.shards = list(shards)
        self._split = split
        self._rng = np.random.default_rng(seed)
        self._num_sample_calls = 0

    @classmethod
    def create(cls, num_shards: int, capacity: int, columns: Mapping[str, Column], alpha: float,
               beta0: float, beta_steps: int, eps: float = 1e-6, split: SplitFn = multinomial_split,
               seed: int | None = None) -> ShardedReplay:
        """num_shards empty buffers of `capacity` slots each, with independent random streams."""
        seeds = np.random.SeedSequence(seed).generate_state(num_shards + 1).tolist()
        shards = [PrioritizedReplayBuffer(capacity, columns, alpha, beta0, beta_steps, eps, seed=s)
                  for s in seeds[1:]]
        return cls(shards, split, seeds[0])

    def __len__(self) -> int:
        """N_total: experiences held over all shards."""
        return sum(len(shard) for shard in self.shards)

    @property
    def beta(self) -> float:
        """Exponent of the next sample's weights, annealed as each shard's would be."""
        shard = self.shards[0]
        return annealed_beta(shard.beta0, shard.beta_steps, self._num_sample_calls)

    def masses(self) -> np.ndarray:
        """m_s = sum of p_i on shard s, shape (N,)."""
        return np.array([shard.priority_mass for shard in self.shards])

    def sample(self, batch_size: int) -> ShardedSample:
        """Split B over the shards by their mass (`split`), then each shard draws its count."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        masses = self.masses()
        if masses.sum() <= 0:
            raise ValueError("cannot sample: every shard is empty")
        counts = self._split(masses, batch_size, self._rng)
        parts = [(s, self.shards[s].sample(int(counts[s]))) for s in np.flatnonzero(counts)]
        indices = np.concatenate([part.indices for _, part in parts])
        priorities = np.concatenate([self.shards[s].priorities[part.indices] for s, part in parts])
        weights = importance_weights(priorities, self.beta)
        self._num_sample_calls += 1
        return ShardedSample(
            np.repeat(np.array([s for s, _ in parts], np.int64), [len(part.indices) for _, part in parts]),
            indices,
            np.concatenate([part.insertion_ids for _, part in parts]),
            weights,
            {name: np.concatenate([part.columns[name] for _, part in parts]) for name in parts[0][1].columns},
        )

    def update_priorities(self, shards: ArrayLike, indices: ArrayLike, insertion_ids: ArrayLike,
                          td_errors: ArrayLike) -> int:
        """Route each TD error to its shard's `update_priorities`; returns how many were updated.

        Every TD error is checked before any shard changes, so a bad one changes nothing.
        """
        shards = np.asarray(shards, np.int64)
        indices = np.asarray(indices, np.int64)
        insertion_ids = np.asarray(insertion_ids, np.int64)
        td_errors = np.asarray(td_errors, np.float64)
        if shards.size and not (0 <= shards.min() and shards.max() < len(self.shards)):
            raise ValueError(f"shard numbers must be in [0, {len(self.shards)}), got {np.unique(shards).tolist()}")
        self.shards[0].priorities_for(td_errors)  # the shards share alpha and eps: one check for all
        return sum(self.shards[s].update_priorities(indices[shards == s], insertion_ids[shards == s],
                                                    td_errors[shards == s])
                   for s in np.unique(shards))
