"""Tabular soft Q-learning, pooled across states, of which retrieval strategy suits which query.

Entropy-regularised Q-learning (Haarnoja et al., 2017, "Reinforcement Learning with Deep
Energy-Based Policies", in its tabular form) with temperature tau, where each state's values are
shrunk towards values pooled over all states (partial pooling, as in hierarchical models):

    Q(s,a)  = (n~ * m(s,a) + k * b(a)) / (n~ + k)     n~ = min(n(s,a), 1/lr); Q = b when n = 0
    pi(a|s) = softmax(Q(s,.) / tau)(a)                Boltzmann policy, explores by itself
    V(s)    = tau * log sum_a exp(Q(s,a) / tau)       soft value (-> max_a Q(s,a) as tau -> 0)
    y       = r + gamma * V(s')                       gamma * V(s') = 0 when there is no s'
    m(s,a) += eta * w * (y - m(s,a))                  eta = max(lr, 1 / n(s,a))
    b(a)   += eta * w * (y - b(a))                    eta = max(lr, 1 / n(a))

w is the replay's importance weight; n(s,a) and n(a) count the (importance-weighted) samples a
cell has learned from, this one included; k is `prior_count`. While n < 1/lr the steps are 1/n,
so m(s,a) is the mean target of a in s and b(a) that of a over all states; later they stay at lr,
an exponentially weighted average over the last ~1/lr updates, so Q can follow a changing
corpus. Q(s,a) is the posterior mean of a state's value under a prior worth k samples of the
pooled value: a rarely seen state acts like the pooled policy, a state never seen gets exactly
it (not a uniform one), and a state departs from it only once its own evidence outweighs k
samples. With k = 0 this is the classic tabular update Q(s,a) += lr * w * (y - Q(s,a)).

Why pooled: the reward of one query is noisy (nDCG of one list is often 0 or 1) while the
strategies differ by a few hundredths on average, so per-state means of a few dozen samples pick
the wrong strategy about as often as the right one; measured on real collections, a per-state
table without pooling ends below the best single strategy.

gamma = 0 (the default) makes each query a one-step episode, i.e. a contextual bandit. tau is on
the scale of reward differences: with rewards in [0, 1] (e.g. nDCG), tau = 0.1 gives a strategy
0.1 better e (2.7) times the probability.

Learning is split so it can be distributed: a learner runs `compute_deltas` on an immutable
`QSnapshot`, and one owner applies the resulting `QDelta` with `SoftQTable.apply_deltas`, which
bumps `version`. A delta computed on an older version is still applied (asynchronous updates as in
A3C); `QDelta.base_version` tells how stale it was. States are the integer ids of
`learners.state_encoder` (the replay's too), so a learner step converts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from learners.replay import NO_NEXT_STATE

FORMAT = 3  # state_dict layout: 3 = pooled row and per-state means with sample weights, int state ids


def policy_from_q(q: np.ndarray, tau: float) -> np.ndarray:
    """softmax(q / tau) over the last axis, stable for any q; shape (..., A) -> (..., A)."""
    z = q / tau
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def soft_value_from_q(q: np.ndarray, tau: float) -> np.ndarray:
    """tau * logsumexp(q / tau) over the last axis, stable for any q; shape (..., A) -> (...)."""
    z = q / tau
    m = z.max(axis=-1, keepdims=True)
    return tau * (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


class Transitions(NamedTuple):
    """B transitions (s, a, r, s'), e.g. a replay sample."""

    states: ArrayLike  # (B,) state ids
    actions: ArrayLike  # (B,) ints in [0, n_actions)
    rewards: ArrayLike  # (B,)
    next_states: ArrayLike  # (B,) state ids; NO_NEXT_STATE: the episode ended, V(s') counts as 0


@dataclass(frozen=True)
class QSnapshot:
    """Q at one version; treat as immutable (its arrays are read-only).

    `pooled` b and `pooled_weight` n(a) have shape (n_actions,); `means` m and `weight` n(s,a)
    have shape (n_states, n_actions), with `rows` mapping a state id to its row.
    """

    version: int
    pooled: np.ndarray
    means: np.ndarray
    rows: Mapping[int, int]
    pooled_weight: np.ndarray
    weight: np.ndarray
    prior_count: float
    horizon: float  # 1 / lr: beyond it, a cell's evidence counts as this many samples

    @property
    def n_actions(self) -> int:
        return self.pooled.shape[0]

    def _cells(self, table: np.ndarray, states: ArrayLike) -> np.ndarray:
        states = np.asarray(states, np.int64).tolist()
        rows = np.fromiter((self.rows.get(s, -1) for s in states), np.int64, len(states))
        known = rows >= 0
        values = np.zeros((len(states), self.n_actions))
        values[known] = table[rows[known]]
        return values

    def state_means(self, states: ArrayLike) -> np.ndarray:
        """m(s, .) of each state, zeros for a state never updated; (B,) -> (B, n_actions)."""
        return self._cells(self.means, states)

    def weights(self, states: ArrayLike) -> np.ndarray:
        """n(s, .) of each state, zeros for a state never updated; (B,) -> (B, n_actions)."""
        return self._cells(self.weight, states)

    def values(self, states: ArrayLike) -> np.ndarray:
        """Q(s, .) of each state, its means shrunk towards the pooled row; (B,) -> (B, n_actions)."""
        n = np.minimum(self.weights(states), self.horizon)
        total = n + self.prior_count
        shrunk = np.divide(n * self.state_means(states) + self.prior_count * self.pooled, total,
                           out=np.zeros_like(n), where=total > 0)
        return np.where(n > 0, shrunk, self.pooled)


@dataclass(frozen=True)
class QDelta:
    """An additive change to the means and sample weights.

    Row i of `means` and `weight` (n_states, n_actions) goes to `states[i]`; `pooled` and
    `pooled_weight` (n_actions,) go to the pooled row.
    """

    states: tuple[int, ...]
    means: np.ndarray
    weight: np.ndarray
    pooled: np.ndarray
    pooled_weight: np.ndarray
    base_version: int  # version of the snapshot it was computed on


def td_targets(snapshot: QSnapshot, batch: Transitions, tau: float, gamma: float) -> np.ndarray:
    """y = r + gamma * V(s') for each transition; shape (B,)."""
    actions = np.asarray(batch.actions, np.int64)
    if len(actions) and (actions.min() < 0 or actions.max() >= snapshot.n_actions):
        raise ValueError(f"actions must be in [0, {snapshot.n_actions}), got {actions.tolist()}")
    next_states = np.asarray(batch.next_states, np.int64)
    has_next = next_states != NO_NEXT_STATE
    v_next = np.zeros(len(actions))
    if has_next.any():
        v_next[has_next] = soft_value_from_q(snapshot.values(next_states[has_next]), tau)
    return np.asarray(batch.rewards, np.float64) + gamma * v_next


def _mean_step(
    cells: tuple[np.ndarray, ...], current: np.ndarray, seen: np.ndarray, w: np.ndarray,
    y: np.ndarray, lr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Step and added weight per cell: eta * (w-weighted mean of y - current), eta = max(lr, W / (n + W)).

    The m samples of a cell take one step sized as m samples would be, so a cell drawn many
    times in a batch (few states, high priority) moves once, boundedly, instead of m times.
    """
    added = np.zeros(current.shape)
    target = np.zeros(current.shape)
    np.add.at(added, cells, w)
    np.add.at(target, cells, w * y)
    drawn = added > 0
    eta = np.maximum(lr, np.divide(added, seen + added, out=np.zeros_like(added), where=drawn))
    mean_target = np.divide(target, added, out=np.zeros_like(added), where=drawn)
    return np.where(drawn, eta * (mean_target - current), 0.0), added


def compute_deltas(
    q_snapshot: QSnapshot,
    batch: Transitions,
    weights: ArrayLike,
    tau: float,
    gamma: float,
    lr: float,
) -> tuple[QDelta, np.ndarray]:
    """The change to Q for a batch, and the TD errors y - Q(s, a), shape (B,).

    Pure: computed against the snapshot.
    """
    w = np.asarray(weights, np.float64)
    actions = np.asarray(batch.actions, np.int64)
    y = td_targets(q_snapshot, batch, tau, gamma)
    td = y - q_snapshot.values(batch.states)[np.arange(len(actions)), actions]
    pooled, pooled_weight = _mean_step((actions,), q_snapshot.pooled, q_snapshot.pooled_weight, w, y, lr)
    states, cell_rows = np.unique(np.asarray(batch.states, np.int64), return_inverse=True)
    cells = (cell_rows.reshape(-1), actions)
    means, weight = _mean_step(cells, q_snapshot.state_means(states), q_snapshot.weights(states), w, y, lr)
    return QDelta(tuple(states.tolist()), means, weight, pooled, pooled_weight, q_snapshot.version), td


class SoftQTable:
    """The owner of Q: acts with pi = softmax(Q/tau) and applies deltas, one version at a time."""

    def __init__(self, n_actions: int, tau: float, lr: float, gamma: float, prior_count: float) -> None:
        if n_actions < 1 or tau <= 0 or not 0 < lr <= 1 or not 0 <= gamma <= 1 or prior_count < 0:
            raise ValueError(
                f"need n_actions >= 1, tau > 0, 0 < lr <= 1, 0 <= gamma <= 1, prior_count >= 0; "
                f"got {n_actions}, {tau}, {lr}, {gamma}, {prior_count}"
            )
        self.n_actions = n_actions
        self.tau = tau
        self.lr = lr
        self.gamma = gamma
        self.prior_count = prior_count
        empty = np.zeros((0, n_actions))
        self._snapshot = self._frozen(0, np.zeros(n_actions), empty, {}, np.zeros(n_actions), empty)

    @property
    def version(self) -> int:
        return self._snapshot.version

    def snapshot(self) -> QSnapshot:
        """The current table; later updates replace it rather than change it, so no copy."""
        return self._snapshot

    def q_values(self, state: int) -> np.ndarray:
        """Q(s, .), shape (n_actions,)."""
        return self._snapshot.values([state])[0]

    def update(
        self, batch: Transitions, weights: ArrayLike | None = None
    ) -> tuple[QDelta, np.ndarray]:
        """compute_deltas on the current table, then apply them; weights default to 1."""
        if weights is None:
            weights = np.ones(len(batch.states))
        delta, td = compute_deltas(self._snapshot, batch, weights, self.tau, self.gamma, self.lr)
        self.apply_deltas(delta)
        return delta, td

    def apply_deltas(self, delta: QDelta) -> int:
        """Add a delta (new states get a row); returns the new version."""
        old = self._snapshot
        rows = dict(old.rows)
        for state in delta.states:
            rows.setdefault(state, len(rows))
        target = [rows[s] for s in delta.states]
        means = np.zeros((len(rows), self.n_actions))
        means[: len(old.means)] = old.means
        np.add.at(means, target, delta.means)
        weight = np.zeros_like(means)
        weight[: len(old.weight)] = old.weight
        np.add.at(weight, target, delta.weight)
        self._snapshot = self._frozen(
            old.version + 1, old.pooled + delta.pooled, means, rows,
            old.pooled_weight + delta.pooled_weight, weight,
        )
        return self.version

    def state_dict(self) -> dict[str, Any]:
        """Plain values: hyperparameters, version, state ids in row order, Q parts."""
        s = self._snapshot
        return {
            "format": FORMAT,
            "n_actions": self.n_actions,
            "tau": self.tau,
            "lr": self.lr,
            "gamma": self.gamma,
            "prior_count": self.prior_count,
            "version": s.version,
            "states": list(s.rows),
            "pooled": s.pooled.copy(),
            "means": s.means.copy(),
            "pooled_weight": s.pooled_weight.copy(),
            "weight": s.weight.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; ValueError for another action count or an older layout.

        Hyperparameters come from the state, as they were when it was saved.
        """
        if state.get("format") != FORMAT:
            raise ValueError(f"Q-table state has layout {state.get('format', 1)}, this code reads {FORMAT}")
        if state["n_actions"] != self.n_actions:
            raise ValueError(f"state has {state['n_actions']} actions, table {self.n_actions}")
        self.tau = state["tau"]
        self.lr = state["lr"]
        self.gamma = state["gamma"]
        self.prior_count = state["prior_count"]
        rows = {int(state_id): i for i, state_id in enumerate(state["states"])}
        self._snapshot = self._frozen(
            state["version"], np.array(state["pooled"], np.float64),
            np.array(state["means"], np.float64), rows,
            np.array(state["pooled_weight"], np.float64), np.array(state["weight"], np.float64),
        )

    def _frozen(
        self, version: int, pooled: np.ndarray, means: np.ndarray, rows: dict[int, int],
        pooled_weight: np.ndarray, weight: np.ndarray,
    ) -> QSnapshot:
        for array in (pooled, means, pooled_weight, weight):
            array.flags.writeable = False
        return QSnapshot(version, pooled, means, rows, pooled_weight, weight, self.prior_count, 1 / self.lr)
