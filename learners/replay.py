"""Proportional prioritized experience replay (Schaul et al., 2016, arXiv:1511.05952).

Experience i is drawn with probability P(i) = p_i / sum_k p_k, where p_i = (|delta_i| + eps)^alpha
(delta_i its last TD error; new experiences get max_k p_k, so each is replayed at least once). The
bias this introduces is corrected with importance-sampling weights w_i = (N * P(i))^-beta divided
by the largest weight in the batch, beta annealed linearly from beta0 to 1.

Sum tree layout. A textbook binary sum tree searched level by level costs numpy calls per level
(log2(capacity) of them), and numpy's ~1 us per call makes that slower than a plain-Python tree
at small batches. `SumTree` is instead two levels of fan-out K = 64: per block of K leaves its
sum and the inclusive prefix sums of its leaves, and at the root the prefix sums of the block
sums. A batched search is about eight numpy calls whatever the capacity: a `searchsorted` over
the root, a gather of the chosen blocks' prefix rows, a compare and an `argmax`. An update
recomputes the prefix row of each touched block (O(K)) and the root prefix sums (O(capacity / K)).
Every stored sum is recomputed from the leaves, never patched with differences, so there is no
floating-point drift and a tree rebuilt from its leaves is bit-identical. Entries from the last
non-zero leaf of a block (or the last non-zero block) onward are +inf, so a prefix rounded past
a total still lands on a non-zero leaf without a clamp. K = 64 beat 32, 128 and 256 overall: the
gather grows with K, the root with 1 / K.

Microseconds per `sample()` with weights and the service's columns (a 14-number context and its
next context; bench/replay_bench.py, 2-core VM; the full table is in bench/RESULTS.md):

    capacity      batch 32: this / Python tree / RLlib     batch 256: this / Python tree / RLlib
    10_000              40 /  73 /   778                         82 /   550 /  5_289
    100_000             47 / 125 /   932                        143 /   977 /  6_747
    1_000_000          208 / 215 / 1_444                        417 / 1_717 /  9_279

At a million slots the gather of two (capacity, 14) float arrays at random rows dominates.

The price is paid on writes: `add` and `update_priorities` are about fifteen numpy calls, 60-150
us. Adding one experience costs about what RLlib's does (a Python tree: 3 us), updating 32
priorities is 0.8-1x the speed of the Python tree, and batches of 256 are 4-7x faster than it.

Memory: the columns' bytes per slot (156 for the service's experiences with 14 context features
and 7 actions) plus 8 for the insertion id and ~16 for the tree, so `nbytes` of a 10_000-slot
buffer is 1.8 MB.

Columns are declared by the owner (`experience_columns` for the service's experiences), each with
a per-experience shape, so a context vector is one row of a (capacity, d) array.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

@dataclass(frozen=True)
class Column:
    """One stored field: its dtype, its shape per experience, and its value when `add` omits it."""

    dtype: np.dtype
    shape: tuple[int, ...] = ()
    default: float | None = None  # None: required


def experience_columns(context_dim: int, n_actions: int) -> dict[str, Column]:
    """The columns of a contextual-bandit experience (x, a, r, x') with what the behaviour policy knew."""
    return {
        "context": Column(np.dtype(np.float32), (context_dim,)),  # the policy's input x
        "fold": Column(np.dtype(np.int8)),  # its cross-fitting fold
        "action": Column(np.dtype(np.int16)),
        "reward": Column(np.dtype(np.float32)),
        # every action's reward in the same search when the feedback gave them all; NaN: not rewarded
        "search_rewards": Column(np.dtype(np.float32), (n_actions,), np.nan),
        "propensity": Column(np.dtype(np.float32)),  # probability the behaviour policy gave `action`
        "policy_version": Column(np.dtype(np.int32)),  # version of the policy that acted
        "next_context": Column(np.dtype(np.float32), (context_dim,), 0.0),  # x' of the session's next search
        "has_next": Column(np.dtype(np.bool_), (), False),  # False: the episode ended with this step
    }


class SumTree:
    """Sums of `capacity` leaves p_i >= 0, with batched update and prefix-sum search.

    Two levels of fan-out K = block_size below a root searched by bisection: per block of K
    leaves its sum and its inclusive prefix sums (a row of K), and at the root the prefix sums
    of the block sums. All of it is views into one flat float64 array.
    """

    def __init__(self, capacity: int, block_size: int = 64) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError(f"capacity and block_size must be >= 1, got {capacity}, {block_size}")
        self.capacity = capacity
        self.block_size = k = block_size
        n_blocks = -(-capacity // k)
        self._tree = np.zeros(2 * n_blocks * k + 2 * n_blocks + 1)
        leaves, leaf_prefix, block_sums, block_prefix = np.split(
            self._tree, np.cumsum([n_blocks * k, n_blocks * k, n_blocks])
        )
        self._leaves = leaves  # p_i, padded to (n_blocks * K,)
        self._leaf_prefix = leaf_prefix.reshape(n_blocks, k)  # per block: p_0, p_0 + p_1, ...
        self._block_sums = block_sums  # (n_blocks,)
        self._block_prefix = block_prefix  # [0, c_0, c_1, ...], c_b = sum of blocks 0..b
        self._leaf_prefix[:] = np.inf  # all empty: +inf from the first entry on (module doc)
        self._block_prefix[1:] = np.inf
        self._total = 0.0
        self.values = leaves[:capacity].view()  # read-only p_i, shape (capacity,)
        self.values.flags.writeable = False

    @property
    def total(self) -> float:
        return self._total

    @property
    def nbytes(self) -> int:
        return self._tree.nbytes

    def update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set p[indices] = values (>= 0, finite); with repeated indices the last value wins."""
        self._leaves[indices] = values
        blocks = np.unique(np.asarray(indices) // self.block_size)
        prefix = np.cumsum(self._leaves.reshape(-1, self.block_size)[blocks], axis=1)  # (m, K)
        self._block_sums[blocks] = prefix[:, -1]
        np.copyto(prefix, np.inf, where=prefix >= prefix[:, -1:])
        self._leaf_prefix[blocks] = prefix
        root = self._block_prefix[1:]
        np.cumsum(self._block_sums, out=root)
        self._total = float(root[-1])
        root[np.searchsorted(root, self._total) :] = np.inf

    def find_prefix_sum(self, values: np.ndarray) -> np.ndarray:
        """Leaf i with sum(p[:i]) <= v < sum(p[:i+1]) for each v in [0, total); shape (B,) -> (B,).

        Never returns a leaf with p_i = 0, even for v >= total.
        """
        if self._total <= 0.0:
            raise ValueError("cannot search a sum tree whose leaves are all zero")
        blocks = np.searchsorted(self._block_prefix[1:], values, side="right")
        residual = values - self._block_prefix[blocks]
        offsets = (self._leaf_prefix[blocks] > residual[:, None]).argmax(axis=1)
        return blocks * self.block_size + offsets


def annealed_beta(beta0: float, beta_steps: int, num_sample_calls: int) -> float:
    """Exponent of the importance weights: beta0 -> 1 linearly over beta_steps sample calls."""
    return beta0 + (1.0 - beta0) * min(1.0, num_sample_calls / beta_steps)


def importance_weights(priorities: np.ndarray, beta: float) -> np.ndarray:
    """w_i = (N P(i))^-beta / max_j (N P(j))^-beta over one batch, shape (B,) -> (B,).

    With P(i) = p_i / sum_k p_k this is (p_i / min_j p_j)^-beta: N and the sum cancel, provided
    every p_i of the batch is divided by the same sum.
    """
    return (priorities / priorities.min()) ** -beta


EPS = 1e-6  # eps of p_i = (|delta_i| + eps)^alpha: an experience with a zero TD error is still drawn


def priorities_for(td_errors: ArrayLike, alpha: float, eps: float) -> np.ndarray:
    """p_i = (|delta_i| + eps)^alpha, shape (B,) -> (B,); ValueError unless all finite and > 0."""
    td_errors = np.asarray(td_errors, np.float64)
    priorities = (np.abs(td_errors) + eps) ** alpha
    if not ((priorities > 0) & (priorities < np.inf)).all():  # also False for NaN
        raise ValueError(
            f"priorities (|td_error| + eps)^alpha must be finite and > 0: non-finite for "
            f"td_errors {td_errors[~np.isfinite(priorities)].tolist()}, zero for td_errors "
            f"{td_errors[priorities == 0].tolist()} (eps={eps}, alpha={alpha})"
        )
    return priorities


class Sample(NamedTuple):
    """A prioritized batch of B experiences."""

    indices: np.ndarray  # (B,) int64 slots, for update_priorities
    insertion_ids: np.ndarray  # (B,) int64, for update_priorities to skip overwritten slots
    weights: np.ndarray  # (B,) float64 importance-sampling weights, max 1
    columns: dict[str, np.ndarray]  # name -> (B, *shape)


class PrioritizedReplayBuffer:
    """FIFO ring of experiences in columnar numpy arrays (one per `Column`), sampled by priority.

    The k-th experience ever added (k = 0, 1, ...) has insertion id k and lives in slot
    k % capacity, so the oldest is overwritten first and a changed id reveals an overwrite.
    """

    def __init__(
        self,
        capacity: int,
        columns: Mapping[str, Column],
        alpha: float,
        beta0: float,
        beta_steps: int,
        eps: float = EPS,
        seed: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if alpha < 0 or eps < 0:
            raise ValueError(f"alpha and eps must be >= 0, got alpha={alpha}, eps={eps}")
        if not 0 <= beta0 <= 1 or beta_steps < 1:
            raise ValueError(f"need 0 <= beta0 <= 1 and beta_steps >= 1, got {beta0}, {beta_steps}")
        self.capacity = capacity
        self.alpha = alpha
        self.beta0 = beta0
        self.beta_steps = beta_steps
        self.eps = eps
        self._rng = np.random.default_rng(seed)
        self._spec = dict(columns)
        self._columns = {name: np.zeros((capacity, *c.shape), c.dtype) for name, c in self._spec.items()}
        self._insertion_id = np.full(capacity, -1, np.int64)  # -1: slot never written
        self._tree = SumTree(capacity)
        self._max_priority = 1.0  # p_1 = 1 in the paper's Algorithm 1
        self._num_added = 0
        self._num_sample_calls = 0

    def __len__(self) -> int:
        return min(self._num_added, self.capacity)

    @property
    def beta(self) -> float:
        """Exponent of the next sample's weights: beta0 -> 1 linearly over beta_steps calls."""
        return annealed_beta(self.beta0, self.beta_steps, self._num_sample_calls)

    @property
    def priorities(self) -> np.ndarray:
        """p_i of every slot, shape (capacity,), read-only; 0 for a slot never written."""
        return self._tree.values

    @property
    def priority_mass(self) -> float:
        """sum_i p_i: what a sharded draw weighs this buffer by."""
        return self._tree.total

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns, insertion ids and sum tree."""
        columns = sum(column.nbytes for column in self._columns.values())
        return columns + self._insertion_id.nbytes + self._tree.nbytes

    def add(self, batch: Mapping[str, ArrayLike]) -> np.ndarray:
        """Append n experiences at max priority; returns their slots, shape (n,).

        `batch` maps every column name (those with a default may be left out) to an array-like of
        shape (n, *shape), or one value for all n. Of a batch longer than the capacity only the
        last `capacity` experiences are kept, as if added one by one.
        """
        unknown = set(batch) - set(self._spec)
        missing = {name for name, c in self._spec.items() if c.default is None} - set(batch)
        if unknown or missing:
            raise ValueError(f"unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        n = max(len(np.atleast_1d(np.asarray(value))) if not self._spec[name].shape
                else len(np.atleast_2d(np.asarray(value))) for name, value in batch.items())
        columns = {}
        for name, c in self._spec.items():
            value = np.asarray(batch[name], c.dtype) if name in batch else np.full(c.shape, c.default, c.dtype)
            if value.shape not in ((n, *c.shape), c.shape):
                raise ValueError(f"field {name!r} has shape {value.shape}, expected {(n, *c.shape)} or {c.shape}")
            columns[name] = np.broadcast_to(value, (n, *c.shape))
        keep = min(n, self.capacity)
        insertion_ids = np.arange(self._num_added + n - keep, self._num_added + n)
        slots = insertion_ids % self.capacity
        for name, column in columns.items():
            self._columns[name][slots] = column[-keep:]
        self._insertion_id[slots] = insertion_ids
        self._tree.update(slots, np.full(keep, self._max_priority))
        self._num_added += n
        return slots

    def sample(self, batch_size: int) -> Sample:
        """Stratified draw: one uniform prefix sum in each of batch_size equal slices of the total.

        Weights are `importance_weights` of the drawn p_i.
        """
        if len(self) == 0:
            raise ValueError("cannot sample from an empty buffer")
        segment = self._tree.total / batch_size
        prefix = (np.arange(batch_size) + self._rng.random(batch_size)) * segment
        indices = self._tree.find_prefix_sum(prefix)
        weights = importance_weights(self._tree.values[indices], self.beta)
        self._num_sample_calls += 1
        return Sample(indices, self._insertion_id[indices], weights,
                      {name: column[indices] for name, column in self._columns.items()})

    def priorities_for(self, td_errors: ArrayLike) -> np.ndarray:
        """p_i = (|delta_i| + eps)^alpha with this buffer's alpha and eps (`priorities_for`)."""
        return priorities_for(td_errors, self.alpha, self.eps)

    def update_priorities(
        self, indices: ArrayLike, insertion_ids: ArrayLike, td_errors: ArrayLike
    ) -> int:
        """Set p_i = (|delta_i| + eps)^alpha for sampled slots; returns how many were updated.

        Slots overwritten since they were sampled (insertion id changed) are skipped: their TD
        error belongs to an experience that is gone. A priority that is not finite and > 0 is a
        ValueError, before anything is changed.
        """
        indices = np.asarray(indices, np.int64)
        priorities = self.priorities_for(td_errors)
        current = self._insertion_id[indices] == np.asarray(insertion_ids, np.int64)
        if current.any():
            self._tree.update(indices[current], priorities[current])
            self._max_priority = max(self._max_priority, float(priorities[current].max()))
        return int(current.sum())

    def emptied(self) -> PrioritizedReplayBuffer:
        """A new empty buffer with this one's settings (its random stream continues this one's)."""
        return PrioritizedReplayBuffer(self.capacity, self._spec, self.alpha, self.beta0, self.beta_steps, self.eps,
                                       seed=int(self._rng.integers(2**63)))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: numpy arrays, scalars and the RNG state."""
        return {
            "capacity": self.capacity,
            "alpha": self.alpha,
            "beta0": self.beta0,
            "beta_steps": self.beta_steps,
            "eps": self.eps,
            "max_priority": self._max_priority,
            "num_added": self._num_added,
            "num_sample_calls": self._num_sample_calls,
            "rng_state": self._rng.bit_generator.state,
            "insertion_id": self._insertion_id.copy(),
            "priorities": self._tree.values.copy(),
            **{name: column.copy() for name, column in self._columns.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict() of a buffer with the same capacity; the tree is rebuilt."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"state has capacity {state['capacity']}, buffer {self.capacity}")
        self.alpha = state["alpha"]
        self.beta0 = state["beta0"]
        self.beta_steps = state["beta_steps"]
        self.eps = state["eps"]
        self._max_priority = state["max_priority"]
        self._num_added = state["num_added"]
        self._num_sample_calls = state["num_sample_calls"]
        self._rng.bit_generator.state = state["rng_state"]
        self._insertion_id[:] = state["insertion_id"]
        for name, column in self._columns.items():
            column[:] = state[name]
        self._tree = SumTree(self.capacity)
        self._tree.update(np.arange(self.capacity), state["priorities"])
