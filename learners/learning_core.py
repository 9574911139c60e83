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
from learners.state_encoder import state_id, state_key


@dataclasses.dataclass(frozen=True)
class LearningConfig:
    capacity: int = 10_000
    alpha: float = 0.6
    beta0: float = 0.4
    beta_steps: int = 100_000
    tau: float = 0.1
    lr: float = 0.001
    gamma: float = 0.0
    prior_count: float = 200.0
    samples_per_insert: float = 8.0
    min_replay_size: int = 32
    max_staleness: int = 8
    seed: int | None = 0


@dataclasses.dataclass(frozen=True)
class Experience:
    """One served search with its reward: (s, a, r, s') plus what the behaviour policy knew."""

    state_key: str
    action: int
    reward: float
    propensity: float
    policy_version: int
    next_state_key: str | None = None


def experiences_from(
    state_key: str, action: int, reward: float, propensity: float, policy_version: int,
    next_state_key: str | None, action_rewards: Sequence[float] | None,
    action_probabilities: Sequence[float] | None,
) -> list[Experience]:
    """The served action's experience, then one per other action when all were rewarded."""
    served = Experience(state_key, action, reward, propensity, policy_version, next_state_key)
    if action_rewards is None or action_probabilities is None:
        return [served]
    others = [
        Experience(state_key, a, r, action_probabilities[a], policy_version, next_state_key)
        for a, r in enumerate(action_rewards) if a != action
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
    """What a serving replica needs to act: Q rows by state key, the actions, tau, a version."""

    version: int
    actions: tuple[str, ...]
    tau: float
    q: QSnapshot


class LearningCore:
    def __init__(self, actions: Sequence[str], config: LearningConfig = LearningConfig()):
        self.actions = tuple(actions)
        self.config = config
        self.buffer = PrioritizedReplayBuffer(
            config.capacity, config.alpha, config.beta0, config.beta_steps, seed=config.seed
        )
        self.table = SoftQTable(
            len(self.actions), config.tau, config.lr, config.gamma, config.prior_count, config.seed
        )
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
            "state": [state_id(e.state_key) for e in experiences],
            "action": [e.action for e in experiences],
            "reward": [e.reward for e in experiences],
            "propensity": [e.propensity for e in experiences],
            "policy_version": [e.policy_version for e in experiences],
            "next_state": [
                NO_NEXT_STATE if e.next_state_key is None else state_id(e.next_state_key)
                for e in experiences
            ],
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
        transitions = Transitions(
            states=[state_key(s) for s in drawn.state],
            actions=drawn.action.astype(np.int64),
            rewards=drawn.reward.astype(np.float64),
            next_states=[None if s == NO_NEXT_STATE else state_key(s) for s in drawn.next_state],
        )
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

    def q_table(self) -> dict[str, list[float]]:
        """Q as JSON-ready {state key: [Q(s, a) for a in actions]}, states seen so far."""
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
