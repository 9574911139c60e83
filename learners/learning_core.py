"""What the `LearningState` actor holds, without Ray or a database: replay, Q-table, rate limit.

Flow: rewarded experiences are `add`ed to the prioritized replay; a learner `sample`s a batch
together with the Q snapshot it must compute against, computes deltas and TD errors elsewhere
(`learners.soft_q.compute_deltas`), and hands them back to `apply_update`, which applies the
deltas, bumps the version and re-prioritises the sampled slots.

Samples per insert (as in Reverb's rate limiter): sampling is refused while the experiences
drawn so far exceed `samples_per_insert` times those inserted, so a fast learner cannot fit the
same few experiences over and over while traffic is slow.

Staleness: a delta computed on a snapshot more than `max_staleness` versions old is rejected,
since it was computed from Q values that later updates have already moved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learners.replay import NO_NEXT_STATE, PrioritizedReplayBuffer
from learners.soft_q import QDelta, QSnapshot, SoftQTable, Transitions
from learners.state_encoder import state_id


@dataclasses.dataclass(frozen=True)
class LearningConfig:
    """Hyperparameters; their defaults live in `configs/settings.yaml` alone."""

    capacity: int
    alpha: float
    beta0: float
    beta_steps: int
    tau: float
    lr: float
    gamma: float
    prior_count: float
    samples_per_insert: float
    min_replay_size: int
    max_staleness: int
    seed: int | None = None  # of the replay's sampling; set in tests that replay a sequence


@dataclasses.dataclass(frozen=True)
class Experience:
    """One (s, a, r, s') with what the behaviour policy knew; states are state ids."""

    state: int
    action: int
    reward: float
    propensity: float
    policy_version: int
    next_state: int = NO_NEXT_STATE


@dataclasses.dataclass(frozen=True)
class RewardedSearch:
    """A served search joined with its feedback, as the `experiences` table stores it."""

    state_key: str
    action: int
    reward: float  # of the served list
    propensity: float
    policy_version: int
    next_state_key: str | None = None
    action_rewards: Sequence[float] | None = None  # every action's reward (graded feedback)
    action_probabilities: Sequence[float] | None = None  # pi(.|s) of the behaviour policy

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RewardedSearch:
        return cls(**{field.name: row[field.name] for field in dataclasses.fields(cls)})

    def experiences(self) -> list[Experience]:
        """The served action's experience, then one per other action when all were rewarded."""
        state = state_id(self.state_key)
        next_state = NO_NEXT_STATE if self.next_state_key is None else state_id(self.next_state_key)
        served = Experience(state, self.action, self.reward, self.propensity, self.policy_version, next_state)
        if self.action_rewards is None or self.action_probabilities is None:
            return [served]
        others = [
            Experience(state, a, r, self.action_probabilities[a], self.policy_version, next_state)
            for a, r in enumerate(self.action_rewards) if a != self.action
        ]
        return [served, *others]


@dataclasses.dataclass(frozen=True)
class LearnerBatch:
    """A prioritized sample and everything a learner needs to turn it into an update."""

    indices: np.ndarray  # (B,) buffer slots
    insertion_ids: np.ndarray  # (B,) to skip slots overwritten meanwhile
    weights: np.ndarray  # (B,) importance weights, max 1
    transitions: Transitions
    snapshot: QSnapshot
    tau: float
    gamma: float
    lr: float


@dataclasses.dataclass(frozen=True)
class PolicySnapshot:
    """What a serving replica needs to act: Q rows by state id, the actions, tau, a version."""

    version: int
    actions: tuple[str, ...]
    tau: float
    q: QSnapshot


class LearningCore:
    def __init__(self, actions: Sequence[str], config: LearningConfig):
        self.actions = tuple(actions)
        self.config = config
        self.buffer = PrioritizedReplayBuffer(
            config.capacity, config.alpha, config.beta0, config.beta_steps, seed=config.seed
        )
        self.table = SoftQTable(len(self.actions), config.tau, config.lr, config.gamma, config.prior_count)
        self.inserted = 0
        self.sampled = 0
        self.updates_applied = 0
        self.updates_rejected = 0

    def add(self, experiences: Sequence[Experience]) -> int:
        """Insert rewarded experiences at max priority; returns the buffer size."""
        if not experiences:
            return len(self.buffer)
        for e in experiences:
            if not 0 <= e.action < len(self.actions):
                raise ValueError(f"action {e.action} is not in [0, {len(self.actions)})")
        self.buffer.add({
            "state": [e.state for e in experiences],
            "action": [e.action for e in experiences],
            "reward": [e.reward for e in experiences],
            "propensity": [e.propensity for e in experiences],
            "policy_version": [e.policy_version for e in experiences],
            "next_state": [e.next_state for e in experiences],
        })
        self.inserted += len(experiences)
        return len(self.buffer)

    def can_sample(self, batch_size: int) -> bool:
        return (
            len(self.buffer) >= self.config.min_replay_size
            and self.sampled + batch_size <= self.config.samples_per_insert * self.inserted
        )

    def sample(self, batch_size: int) -> LearnerBatch | None:
        """A prioritized batch, or None while the buffer is small or the rate limit holds."""
        if not self.can_sample(batch_size):
            return None
        drawn = self.buffer.sample(batch_size)
        self.sampled += batch_size
        transitions = Transitions(drawn.state, drawn.action, drawn.reward.astype(np.float64), drawn.next_state)
        return LearnerBatch(
            drawn.indices, drawn.insertion_ids, drawn.weights, transitions, self.table.snapshot(),
            self.table.tau, self.table.gamma, self.table.lr,
        )

    def apply_update(
        self, delta: QDelta, indices: np.ndarray, insertion_ids: np.ndarray, td_errors: np.ndarray
    ) -> bool:
        """Apply a learner's delta and priorities; False (nothing changed) when it is too stale."""
        if self.table.version - delta.base_version > self.config.max_staleness:
            self.updates_rejected += 1
            return False
        self.buffer.update_priorities(indices, insertion_ids, td_errors)
        self.table.apply_deltas(delta)
        self.updates_applied += 1
        return True

    def policy(self) -> PolicySnapshot:
        return PolicySnapshot(self.table.version, self.actions, self.table.tau, self.table.snapshot())

    def stats(self) -> dict[str, Any]:
        return {
            "policy_version": self.table.version,
            "replay_size": len(self.buffer),
            "replay_bytes": self.buffer.nbytes,
            "q_table_states": len(self.table.snapshot().rows),
            "inserted": self.inserted,
            "sampled": self.sampled,
            "updates_applied": self.updates_applied,
            "updates_rejected": self.updates_rejected,
            "beta": self.buffer.beta,
        }

    def q_table(self) -> dict[int, list[float]]:
        """Q as {state id: [Q(s, a) for a in actions]}, states seen so far."""
        snapshot = self.table.snapshot()
        return dict(zip(snapshot.rows, snapshot.values(list(snapshot.rows)).tolist(), strict=True))

    def pooled_q(self) -> list[float]:
        """b(a) for a in actions: Q of a state never seen."""
        return self.table.snapshot().pooled.tolist()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: buffer, table and counters (plain values)."""
        return {
            "buffer": self.buffer.state_dict(),
            "table": self.table.state_dict(),
            "counters": {"inserted": self.inserted, "sampled": self.sampled,
                         "updates_applied": self.updates_applied,
                         "updates_rejected": self.updates_rejected},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; the table first, so a layout it refuses changes nothing."""
        self.table.load_state_dict(state["table"])
        self.buffer.load_state_dict(state["buffer"])
        counters = state["counters"]
        self.inserted = counters["inserted"]
        self.sampled = counters["sampled"]
        self.updates_applied = counters["updates_applied"]
        self.updates_rejected = counters["updates_rejected"]
