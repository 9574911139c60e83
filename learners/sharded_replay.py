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

`ShardedSampler` is that math with the shards left abstract: `ShardedReplay` holds them as local
buffers; the running service reaches them as Ray actors (`cluster.actors.replay_shards`). Where an
experience lives does not change what is drawn; `shard_of` routes by a stable hash of its context,
so a search's experiences (one per action when graded) share a shard and a restart keeps the routing.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from learners.replay import (EPS, Column, PrioritizedReplayBuffer, Sample, annealed_beta, importance_weights,
                            priorities_for)
from learners.value_model import context_key

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


class ShardDraw(NamedTuple):
    """What one shard gives for its part of a batch: its own draw and the p_i of the drawn slots."""

    shard: int
    sample: Sample  # its weights, normalised within the shard, are not used
    priorities: np.ndarray  # (c_s,) p_i of sample.indices


def shard_of(context: ArrayLike, num_shards: int) -> int:
    """The shard an experience with this context lives on: stable across processes and restarts.

    The high half of `context_key`, so the shard does not follow the cross-fitting fold (its low bits).
    """
    return (context_key(context) >> 32) % num_shards


class ShardStatus(NamedTuple):
    """Per shard, shape (N,) each: experiences held, priority mass, bytes held."""

    sizes: np.ndarray
    masses: np.ndarray
    nbytes: np.ndarray


class ShardedSampler(abc.ABC):
    """The two-stage draw (module doc) over N shards; subclasses say how a shard is reached.

    The shards must share alpha and eps (else their priorities are not comparable). beta anneals
    from beta0 to 1 over beta_steps of this sampler's calls, as one buffer's would.
    """

    def __init__(self, num_shards: int, alpha: float, eps: float, beta0: float, beta_steps: int,
                 split: SplitFn = multinomial_split, seed: int | None = None) -> None:
        if num_shards < 1:
            raise ValueError("need at least one shard")
        self.num_shards = num_shards
        self.alpha, self.eps, self.beta0, self.beta_steps = alpha, eps, beta0, beta_steps
        self._split = split
        self._rng = np.random.default_rng(seed)
        self.num_sample_calls = 0

    # -- how the shards are reached ----------------------------------------------------------
    @abc.abstractmethod
    def status(self) -> ShardStatus:
        """Every shard's size, mass and bytes (one look at each)."""

    @abc.abstractmethod
    def _draw(self, counts: np.ndarray) -> list[ShardDraw]:
        """Shard s draws counts[s] experiences, for each s with counts[s] > 0, in shard order."""

    @abc.abstractmethod
    def _add(self, parts: dict[int, dict[str, np.ndarray]]) -> None:
        """Append each shard's rows (column name -> (n_s, *shape))."""

    @abc.abstractmethod
    def _update(self, parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
        """Per shard, `update_priorities(indices, insertion_ids, td_errors)`; how many were updated."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Empty every shard."""

    # -- the math ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """N_total: experiences held over all shards."""
        return int(self.status().sizes.sum())

    def masses(self) -> np.ndarray:
        """m_s = sum of p_i on shard s, shape (N,)."""
        return self.status().masses

    @property
    def beta(self) -> float:
        """Exponent of the next sample's weights."""
        return annealed_beta(self.beta0, self.beta_steps, self.num_sample_calls)

    def add(self, batch: Mapping[str, ArrayLike], shards: ArrayLike) -> None:
        """Append experience k of `batch` (column name -> (n, *shape)) to shard `shards[k]`."""
        shards = np.asarray(shards, np.int64)
        columns = {name: np.asarray(value) for name, value in batch.items()}
        self._add({int(s): {name: value[shards == s] for name, value in columns.items()}
                   for s in np.unique(shards)})

    def sample(self, batch_size: int, masses: np.ndarray | None = None) -> ShardedSample:
        """Split B over the shards by their mass (`split`), then each shard draws its count.

        `masses`: the shards' masses when the caller has just read them (one round trip fewer).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        masses = self.masses() if masses is None else masses
        if masses.sum() <= 0:
            raise ValueError("cannot sample: every shard is empty")
        counts = np.array([batch_size]) if self.num_shards == 1 else self._split(masses, batch_size, self._rng)
        parts = self._draw(counts)
        weights = importance_weights(np.concatenate([part.priorities for part in parts]), self.beta)
        self.num_sample_calls += 1
        return ShardedSample(
            np.repeat(np.array([part.shard for part in parts], np.int64), [len(part.priorities) for part in parts]),
            np.concatenate([part.sample.indices for part in parts]),
            np.concatenate([part.sample.insertion_ids for part in parts]),
            weights,
            {name: np.concatenate([part.sample.columns[name] for part in parts]) for name in parts[0].sample.columns},
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
        if shards.size and not (0 <= shards.min() and shards.max() < self.num_shards):
            raise ValueError(f"shard numbers must be in [0, {self.num_shards}), got {np.unique(shards).tolist()}")
        priorities_for(td_errors, self.alpha, self.eps)
        return self._update({int(s): (indices[shards == s], insertion_ids[shards == s], td_errors[shards == s])
                             for s in np.unique(shards)})


class ShardedReplay(ShardedSampler):
    """N local prioritized replay buffers sampled as one (module doc).

    The shards must share alpha, eps and the beta schedule. Experiences may be added to a shard
    directly (`shards[s].add`) or routed (`add`).
    """

    def __init__(self, shards: Sequence[PrioritizedReplayBuffer], split: SplitFn = multinomial_split,
                 seed: int | None = None) -> None:
        if not shards:
            raise ValueError("need at least one shard")
        settings = {(s.alpha, s.eps, s.beta0, s.beta_steps) for s in shards}
        if len(settings) > 1:
            raise ValueError(f"shards must share (alpha, eps, beta0, beta_steps), got {sorted(settings)}")
        first = shards[0]
        super().__init__(len(shards), first.alpha, first.eps, first.beta0, first.beta_steps, split, seed)
        self.shards = list(shards)

    @classmethod
    def create(cls, num_shards: int, capacity: int, columns: Mapping[str, Column], alpha: float,
               beta0: float, beta_steps: int, eps: float = EPS, split: SplitFn = multinomial_split,
               seed: int | None = None) -> ShardedReplay:
        """num_shards empty buffers of `capacity` slots each, with independent random streams."""
        seeds = np.random.SeedSequence(seed).generate_state(num_shards + 1).tolist()
        shards = [PrioritizedReplayBuffer(capacity, columns, alpha, beta0, beta_steps, eps, seed=s)
                  for s in seeds[1:]]
        return cls(shards, split, seeds[0])

    def status(self) -> ShardStatus:
        return ShardStatus(np.array([len(shard) for shard in self.shards]),
                           np.array([shard.priority_mass for shard in self.shards]),
                           np.array([shard.nbytes for shard in self.shards]))

    def _draw(self, counts: np.ndarray) -> list[ShardDraw]:
        return [draw_from(self.shards[s], int(s), int(counts[s])) for s in np.flatnonzero(counts)]

    def _add(self, parts: dict[int, dict[str, np.ndarray]]) -> None:
        for s, batch in parts.items():
            self.shards[s].add(batch)

    def _update(self, parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
        return sum(self.shards[s].update_priorities(*part) for s, part in parts.items())

    def clear(self) -> None:
        self.shards = [shard.emptied() for shard in self.shards]


def draw_from(buffer: PrioritizedReplayBuffer, shard: int, count: int) -> ShardDraw:
    """One shard's part of a sharded batch."""
    sample = buffer.sample(count)
    return ShardDraw(shard, sample, buffer.priorities[sample.indices])
