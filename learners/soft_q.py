"""Tabular soft Q-learning of which retrieval strategy (action) suits which query state.

Entropy-regularised Q-learning (Haarnoja et al., 2017, "Reinforcement Learning with Deep
Energy-Based Policies", in its tabular form) with temperature tau:

    pi(a|s) = softmax(Q(s,.) / tau)(a)                    Boltzmann policy, explores by itself
    V(s)    = tau * log sum_a exp(Q(s,a) / tau)           soft value (-> max_a Q(s,a) as tau -> 0)
    delta   = r + gamma * V(s') - Q(s,a)                  gamma * V(s') = 0 when there is no s'
    Q(s,a) += lr * w * delta                              w: importance weight from the replay
                                                          (averaged over repeats of (s,a) in a batch)

gamma = 0 (the default) makes each query a one-step episode, i.e. a contextual bandit where
Q(s,a) is an exponentially weighted average of the rewards of a in s. tau is on the scale of reward differences: with rewards
in [0, 1] (e.g. nDCG), tau = 0.1 gives a strategy 0.1 better e (2.7) times the probability.

Learning is split so it can be distributed: a learner runs `compute_deltas` on an immutable
`QSnapshot`, and one owner applies the resulting `QDelta` with `SoftQTable.apply_deltas`, which
bumps `version`. A delta computed on an older version is still applied (asynchronous updates as in
A3C); `QDelta.base_version` tells how stale it was. States are string keys
(`learners.state_encoder.encode_state`); a state never updated has Q = 0, a uniform policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike


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
    """B transitions (s, a, r, s'), e.g. a replay sample with state ids mapped back to keys."""

    states: Sequence[str]  # (B,)
    actions: ArrayLike  # (B,) ints in [0, n_actions)
    rewards: ArrayLike  # (B,)
    next_states: Sequence[str | None]  # (B,); None: the episode ended, V(s') counts as 0


@dataclass(frozen=True)
class QSnapshot:
    """A Q table at one version; treat as immutable (its array is read-only).

    `q` has shape (n_states, n_actions); `rows` maps a state key to its row.
    """

    version: int
    q: np.ndarray
    rows: Mapping[str, int]

    @property
    def n_actions(self) -> int:
        return self.q.shape[1]

    def values(self, states: Sequence[str]) -> np.ndarray:
        """Q(s, .) of each state, zeros for a state never updated; (B,) -> (B, n_actions)."""
        rows = np.fromiter((self.rows.get(s, -1) for s in states), np.int64, len(states))
        known = rows >= 0
        values = np.zeros((len(states), self.n_actions))
        values[known] = self.q[rows[known]]
        return values


@dataclass(frozen=True)
class QDelta:
    """An additive change to Q: row i of `values` (n_states, n_actions) goes to `states[i]`."""

    states: tuple[str, ...]
    values: np.ndarray
    base_version: int  # version of the snapshot it was computed on


def td_errors(snapshot: QSnapshot, batch: Transitions, tau: float, gamma: float) -> np.ndarray:
    """delta = r + gamma * V(s') - Q(s, a) for each transition; shape (B,)."""
    actions = np.asarray(batch.actions, np.int64)
    if len(actions) and (actions.min() < 0 or actions.max() >= snapshot.n_actions):
        raise ValueError(f"actions must be in [0, {snapshot.n_actions}), got {actions.tolist()}")
    q_sa = snapshot.values(batch.states)[np.arange(len(actions)), actions]
    has_next = [i for i, s in enumerate(batch.next_states) if s is not None]
    v_next = np.zeros(len(actions))
    if has_next:
        next_q = snapshot.values([batch.next_states[i] for i in has_next])
        v_next[has_next] = soft_value_from_q(next_q, tau)
    return np.asarray(batch.rewards, np.float64) + gamma * v_next - q_sa


def compute_deltas(
    q_snapshot: QSnapshot,
    batch: Transitions,
    weights: ArrayLike,
    tau: float,
    gamma: float,
    lr: float,
) -> tuple[QDelta, np.ndarray]:
    """The change to Q for a batch, and the TD errors delta, shape (B,).

    Each (s, a) moves by lr times the mean of w * delta over its n occurrences in the batch:
    the per-sample rule Q(s,a) += lr * w * delta, averaged rather than summed, so a pair drawn
    many times (few states, high priority) still takes one bounded step instead of n of them,
    which would overshoot and diverge once n * lr * w > 2. Pure: computed against the snapshot.
    """
    td = td_errors(q_snapshot, batch, tau, gamma)
    weighted = np.asarray(weights, np.float64) * td
    states = tuple(dict.fromkeys(batch.states))  # unique, in first-seen order
    row = {s: i for i, s in enumerate(states)}
    cells = ([row[s] for s in batch.states], np.asarray(batch.actions, np.int64))
    sums = np.zeros((len(states), q_snapshot.n_actions))
    counts = np.zeros_like(sums)
    np.add.at(sums, cells, weighted)
    np.add.at(counts, cells, 1.0)
    values = lr * np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return QDelta(states, values, q_snapshot.version), td


class SoftQTable:
    """The owner of Q: acts with pi = softmax(Q/tau) and applies deltas, one version at a time."""

    def __init__(
        self,
        n_actions: int,
        tau: float = 0.1,
        lr: float = 0.1,
        gamma: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if n_actions < 1 or tau <= 0 or lr <= 0 or not 0 <= gamma <= 1:
            raise ValueError(
                f"need n_actions >= 1, tau > 0, lr > 0, 0 <= gamma <= 1; got {n_actions}, "
                f"{tau}, {lr}, {gamma}"
            )
        self.n_actions = n_actions
        self.tau = tau
        self.lr = lr
        self.gamma = gamma
        self._rng = np.random.default_rng(seed)
        self._snapshot = _frozen_snapshot(0, np.zeros((0, n_actions)), {})

    @property
    def version(self) -> int:
        return self._snapshot.version

    def snapshot(self) -> QSnapshot:
        """The current table; later updates replace it rather than change it, so no copy."""
        return self._snapshot

    def q_values(self, state: str) -> np.ndarray:
        return self._snapshot.values([state])[0]

    def policy(self, state: str) -> np.ndarray:
        """pi(.|s), shape (n_actions,)."""
        return policy_from_q(self.q_values(state), self.tau)

    def soft_value(self, state: str) -> float:
        return float(soft_value_from_q(self.q_values(state), self.tau))

    def act(self, state: str, rng: np.random.Generator | None = None) -> tuple[int, float]:
        """Draw a ~ pi(.|s); returns a and its propensity pi(a|s), for off-policy correction."""
        probs = self.policy(state)
        action = int((rng or self._rng).choice(self.n_actions, p=probs))
        return action, float(probs[action])

    def td_error(
        self, state: str, action: int, reward: float, next_state: str | None = None
    ) -> float:
        batch = Transitions([state], [action], [reward], [next_state])
        return float(td_errors(self._snapshot, batch, self.tau, self.gamma)[0])

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
        """Q[s] += delta for each of its states (new states get a row); returns the new version."""
        old = self._snapshot
        rows = dict(old.rows)
        for state in delta.states:
            rows.setdefault(state, len(rows))
        q = np.zeros((len(rows), self.n_actions))
        q[: len(old.q)] = old.q
        np.add.at(q, [rows[s] for s in delta.states], delta.values)
        self._snapshot = _frozen_snapshot(old.version + 1, q, rows)
        return self.version

    def state_dict(self) -> dict[str, Any]:
        """Plain values: hyperparameters, version, state keys in row order, Q, RNG state."""
        return {
            "n_actions": self.n_actions,
            "tau": self.tau,
            "lr": self.lr,
            "gamma": self.gamma,
            "version": self.version,
            "states": list(self._snapshot.rows),
            "q": self._snapshot.q.copy(),
            "rng_state": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["n_actions"] != self.n_actions:
            raise ValueError(f"state has {state['n_actions']} actions, table {self.n_actions}")
        self.tau = state["tau"]
        self.lr = state["lr"]
        self.gamma = state["gamma"]
        self._rng.bit_generator.state = state["rng_state"]
        rows = {key: i for i, key in enumerate(state["states"])}
        self._snapshot = _frozen_snapshot(state["version"], np.array(state["q"], np.float64), rows)


def _frozen_snapshot(version: int, q: np.ndarray, rows: dict[str, int]) -> QSnapshot:
    q.flags.writeable = False
    return QSnapshot(version, q, rows)
