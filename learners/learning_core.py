"""What the `LearningState` actor holds, without Ray or a database: replay, value model, rate limit.

Flow: searches with their measured quality and costs are `add_searches`ed: each gets its rewards,
the value model first scores itself on them (the gate's prequential evidence, `ValueModel.observe`),
then they enter the prioritized replay. A learner
`sample`s a batch together with the snapshot it must compute against, computes the batch's
statistics and TD errors elsewhere (`learners.value_model.compute_deltas`), and hands them back
to `apply_update`, which adds them, refits, bumps the version and re-prioritises the sampled slots.

Samples per insert (as in Reverb's rate limiter): sampling is refused while the experiences
drawn so far exceed `samples_per_insert` times those inserted, so a fast learner cannot fit the
same few experiences over and over while traffic is slow.

Reward: r(a) = quality(a) - cost_weight * c(a), where c(a) is the action's expected CPU ms, the
mean of its last COST_MEMORY measured costs. The cost a stage measures for one search carries the
machine's load (on a busy 2-core machine a dense side's 56 ms varied by +-25 ms from search to
search): noise no context can predict, which would bury a per-query choice worth a few ms.

Replay: one local buffer, or N shards reached elsewhere (`learners.sharded_replay`); either way
an experience is drawn with p_i / M over all of them. A batch names experience k by one index,
slot * N + shard (the slot itself for one shard), so learners need not know about shards.

Staleness: a delta computed on a snapshot more than `max_staleness` versions old is rejected,
since its TD targets and priorities came from values that later updates have already moved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learners.context_bins import ContextBins
from learners.replay import PrioritizedReplayBuffer, experience_columns
from learners.sharded_replay import ShardedReplay, ShardedSampler, shard_of
from learners.value_model import Transitions, ValueDelta, ValueModel, ValueSnapshot, fold_of

COST_MEMORY = 1000  # measured costs per action in its expected cost: its noise falls below 1 ms


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
    margin: float
    explore_max: float
    samples_per_insert: float
    min_replay_size: int
    max_staleness: int
    cost_weight: float  # lambda: reward = quality - lambda * expected CPU ms
    context_bins: int  # k steps per context feature (`learners.context_bins`); 0: linear in the raw features
    seed: int | None = None  # of the replay's sampling; set in tests that replay a sequence


@dataclasses.dataclass(frozen=True)
class Experience:
    """One (x, a, r, x') with what the behaviour policy knew; x is the context vector."""

    context: Sequence[float]
    action: int
    reward: float
    propensity: float
    policy_version: int
    next_context: Sequence[float] | None = None
    search_rewards: Sequence[float] | None = None  # every action's, when the search's feedback gave them


@dataclasses.dataclass(frozen=True)
class RewardedSearch:
    """A served search joined with its feedback, as the `experiences` table stores it.

    With graded feedback every action's quality and cost are known (`action_quality`,
    `action_costs`, measured at feedback time), so one search teaches every action, each with the
    probability the behaviour policy gave it; with clicks only the served action's are.
    """

    context: Sequence[float]
    action: int
    quality: float  # of the served action: nDCG of its list, or the answer's rating
    cost: float  # CPU ms the served action's stages took
    propensity: float
    policy_version: int
    next_context: Sequence[float] | None = None
    action_quality: Sequence[float] | None = None
    action_costs: Sequence[float] | None = None
    action_probabilities: Sequence[float] | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RewardedSearch:
        return cls(**{field.name: row[field.name] for field in dataclasses.fields(cls)})

    @property
    def graded(self) -> bool:
        """Whether every action was measured."""
        return self.action_quality is not None and self.action_costs is not None

    def experiences(self, rewards: Sequence[float]) -> list[Experience]:
        """The served action's experience, then one per other action when all were measured.

        `rewards`: per action, as the learner defines them (only the served one's is read for clicks).
        """
        every = rewards if self.graded and self.action_probabilities is not None else None
        served = Experience(self.context, self.action, rewards[self.action], self.propensity,
                            self.policy_version, self.next_context, every)
        if every is None:
            return [served]
        others = [
            Experience(self.context, a, r, self.action_probabilities[a], self.policy_version, self.next_context,
                       rewards)
            for a, r in enumerate(rewards) if a != self.action
        ]
        return [served, *others]


@dataclasses.dataclass(frozen=True)
class LearnerBatch:
    """A prioritized sample and everything a learner needs to turn it into an update."""

    indices: np.ndarray  # (B,) slot * N + shard, N shards (module doc)
    insertion_ids: np.ndarray  # (B,) to skip slots overwritten meanwhile
    weights: np.ndarray  # (B,) importance weights, max 1
    transitions: Transitions
    snapshot: ValueSnapshot
    gamma: float


@dataclasses.dataclass(frozen=True)
class PolicySnapshot:
    """One head's policy as a serving replica acts on it: the value model at a version, and its actions."""

    version: int
    actions: tuple[str, ...]
    features: tuple[str, ...]
    model: ValueSnapshot


@dataclasses.dataclass(frozen=True)
class Policies:
    """What a serving replica acts on: each head's policy; `version` changes whenever one does."""

    version: int
    retrieval: PolicySnapshot
    answer: PolicySnapshot


class LearningCore:
    """One head's learning: rewards, value model, rate limit, over a replay it holds or shares.

    `shards`: replay shards held elsewhere (e.g. Ray actors), which outlive this core: a new core
    over them neither empties them nor checkpoints them (they do that themselves). None: one local
    buffer, part of `state_dict`.
    """

    def __init__(self, actions: Sequence[str], features: Sequence[str], default_action: int,
                 config: LearningConfig, shards: ShardedSampler | None = None,
                 gate_groups: Sequence[int] | None = None):
        self.actions = tuple(actions)
        self.features = tuple(features)
        self.config = config
        self.model = ValueModel(
            len(self.actions), len(self.features), prior_count=config.prior_count, lr=config.lr,
            tau=config.tau, margin=config.margin, explore_max=config.explore_max, default_action=default_action,
            bins=config.context_bins, gate_groups=gate_groups,
        )
        self._shards = shards
        self._empty_replay()

    def _new_buffer(self) -> PrioritizedReplayBuffer:
        return PrioritizedReplayBuffer(
            self.config.capacity, experience_columns(len(self.features), len(self.actions)), self.config.alpha,
            self.config.beta0, self.config.beta_steps, seed=self.config.seed,
        )

    def _empty_replay(self) -> None:
        self.replay = (ShardedReplay([self._new_buffer()], seed=self.config.seed) if self._shards is None
                       else self._shards)
        self.expected_cost = np.zeros(len(self.actions))  # (A,) c(a): mean of the last measured costs
        self.costs_measured = np.zeros(len(self.actions))  # (A,) how many, up to COST_MEMORY
        self.inserted = 0
        self.sampled = 0
        self.updates_applied = 0
        self.updates_rejected = 0
        self.last_context: list[float] | None = None  # the sample context of `model_report`

    @property
    def buffer(self) -> PrioritizedReplayBuffer:
        """The local replay buffer; ValueError when the replay is sharded elsewhere."""
        if self._shards is not None:
            raise ValueError("this core's replay is sharded over other processes: it has no local buffer")
        return self.replay.shards[0]

    def forget(self) -> None:
        """Start learning afresh: an empty replay and a fresh model at a new version."""
        if self._shards is not None:
            self._shards.clear()
        self._empty_replay()
        self.model.forget()

    def add_searches(self, searches: Sequence[RewardedSearch]) -> int:
        """Reward each new search, score the model on it (the gate), then insert its experiences;
        returns the buffer size."""
        experiences = []
        for search in searches:
            rewards = self.rewards(search)
            self.model.observe(search.context, search.action, rewards if search.graded else None,
                               float(rewards[search.action]), search.propensity)
            experiences += search.experiences(rewards.tolist())
        if searches:
            self.model.refresh()
            self.last_context = list(searches[-1].context)
        return self.add(experiences)

    def rewards(self, search: RewardedSearch) -> np.ndarray:
        """r(a) = quality(a) - cost_weight * c(a) per action, after counting the search's costs; (A,).

        Only the served action's entry means anything for a click.
        """
        if not 0 <= search.action < len(self.actions):
            raise ValueError(f"action {search.action} is not in [0, {len(self.actions)})")
        quality = np.zeros(len(self.actions))
        if search.graded:
            quality[:] = search.action_quality
            self._measure_costs(np.arange(len(self.actions)), np.asarray(search.action_costs, np.float64))
        quality[search.action] = search.quality
        self._measure_costs(np.array([search.action]), np.array([search.cost], np.float64))
        return quality - self.config.cost_weight * self.expected_cost

    def _measure_costs(self, actions: np.ndarray, costs: np.ndarray) -> None:
        """Fold measured costs into c(a): a running mean over the last COST_MEMORY (exponential beyond)."""
        self.costs_measured[actions] = np.minimum(self.costs_measured[actions] + 1, COST_MEMORY)
        self.expected_cost[actions] += (costs - self.expected_cost[actions]) / self.costs_measured[actions]

    def add(self, experiences: Sequence[Experience]) -> int:
        """Insert rewarded experiences at max priority, each on its context's shard; returns the replay size."""
        if not experiences:
            return len(self.replay)
        for e in experiences:
            if not 0 <= e.action < len(self.actions):
                raise ValueError(f"action {e.action} is not in [0, {len(self.actions)})")
            if len(e.context) != len(self.features):
                raise ValueError(f"context has {len(e.context)} features, the model {len(self.features)}")
        shards = [shard_of(e.context, self.replay.num_shards) if self.replay.num_shards > 1 else 0
                  for e in experiences]
        self.replay.add({
            "context": [e.context for e in experiences],
            "fold": [fold_of(e.context) for e in experiences],
            "action": [e.action for e in experiences],
            "reward": [e.reward for e in experiences],
            "propensity": [e.propensity for e in experiences],
            "policy_version": [e.policy_version for e in experiences],
            "next_context": [e.next_context if e.next_context is not None else np.zeros(len(self.features))
                             for e in experiences],
            "has_next": [e.next_context is not None for e in experiences],
            "search_rewards": [e.search_rewards if e.search_rewards is not None else np.full(len(self.actions), np.nan)
                               for e in experiences],
        }, shards)
        self.inserted += len(experiences)
        return len(self.replay)

    def _within_rate(self, batch_size: int) -> bool:
        return self.sampled + batch_size <= self.config.samples_per_insert * self.inserted

    def can_sample(self, batch_size: int) -> bool:
        return self._within_rate(batch_size) and len(self.replay) >= self.config.min_replay_size

    def sample(self, batch_size: int) -> LearnerBatch | None:
        """A prioritized batch, or None while the replay is small or the rate limit holds."""
        if not self._within_rate(batch_size):  # first: it needs no look at the shards
            return None
        status = self.replay.status()
        if status.sizes.sum() < self.config.min_replay_size:
            return None
        drawn = self.replay.sample(batch_size, status.masses)
        self.sampled += batch_size
        c = drawn.columns
        transitions = Transitions(c["context"].astype(np.float64), c["fold"], c["action"],
                                  c["reward"].astype(np.float64), c["next_context"].astype(np.float64), c["has_next"],
                                  c["search_rewards"].astype(np.float64))
        return LearnerBatch(drawn.indices * self.replay.num_shards + drawn.shards, drawn.insertion_ids,
                            drawn.weights, transitions, self.model.snapshot(), self.config.gamma)

    def apply_update(
        self, delta: ValueDelta, indices: np.ndarray, insertion_ids: np.ndarray, td_errors: np.ndarray
    ) -> bool:
        """Apply a learner's delta and priorities; False (nothing changed) when it is too stale or was
        computed with the context bins' edges before they were learned."""
        if self.model.version - delta.base_version > self.config.max_staleness or not self.model.accepts(delta):
            self.updates_rejected += 1
            return False
        indices = np.asarray(indices, np.int64)
        shards = self.replay.num_shards
        self.replay.update_priorities(indices % shards, indices // shards, insertion_ids, td_errors)
        self.model.apply_deltas(delta)
        self.updates_applied += 1
        return True

    def policy(self) -> PolicySnapshot:
        return PolicySnapshot(self.model.version, self.actions, self.features, self.model.snapshot())

    def stats(self) -> dict[str, Any]:
        status = self.replay.status()
        return {
            "policy_version": self.model.version,
            "replay_size": int(status.sizes.sum()),
            "replay_bytes": int(status.nbytes.sum()),
            "replay_shards": status.sizes.tolist(),
            "inserted": self.inserted,
            "sampled": self.sampled,
            "updates_applied": self.updates_applied,
            "updates_rejected": self.updates_rejected,
            "beta": self.replay.beta,
        }

    def model_report(self) -> dict[str, Any]:
        """The model for people: parameters, gate, exploration, per-action averages, and its values
        for a sample context (the last search learned from)."""
        s = self.model.snapshot()
        sample_context = self.last_context
        report: dict[str, Any] = {
            "policy_version": s.version,
            "actions": list(self.actions),
            "features": list(self.features),
            "theta": {a: dict(zip(_phi_names(s.bins, self.features), row.tolist(), strict=True))
                      for a, row in zip(self.actions, s.theta, strict=True)},
            "context_bins": None if s.bins is None else {
                "bins": self.config.context_bins,
                "edges": dict(zip(self.features, s.bins.edges.tolist(), strict=True)) if s.bins.learned else None,
            },
            "pooled": dict(zip(self.actions, s.pooled.tolist(), strict=True)),
            "experiences_per_action": dict(zip(self.actions, s.seen.tolist(), strict=True)),
            "pooled_choice": self.actions[s.pooled_action()],
            "preferred_over_default": [self.actions[a] for a in s.preferred],
            "default_action": self.actions[s.default_action],
            "gates": {a: {**gate, "open": i in s.open_actions}
                      for i, (a, gate) in enumerate(zip(self.actions, self.model.gates(), strict=True))},
            "margin": s.margin,
            "exploration_rate": s.epsilon,
            "tau": s.tau,
            "cost_weight": self.config.cost_weight,
            "expected_cost_cpu_ms": dict(zip(self.actions, self.expected_cost.tolist(), strict=True)),
        }
        if sample_context is not None:
            values = s.values(np.asarray(sample_context, np.float64))[0]
            report["sample"] = {
                "context": dict(zip(self.features, list(sample_context), strict=True)),
                "values": dict(zip(self.actions, values.tolist(), strict=True)),
                "greedy": self.actions[int(s.greedy_actions(np.asarray(sample_context))[0])],
                "probabilities": dict(zip(self.actions, s.probabilities(np.asarray(sample_context))[0].tolist(),
                                          strict=True)),
            }
        return report

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: buffer (a local one), model and counters (plain values)."""
        return {
            "actions": list(self.actions),
            "features": list(self.features),
            **({} if self._shards is not None else {"buffer": self.buffer.state_dict()}),
            "sample_calls": self.replay.num_sample_calls,
            "model": self.model.state_dict(),
            "counters": {"inserted": self.inserted, "sampled": self.sampled,
                         "updates_applied": self.updates_applied,
                         "updates_rejected": self.updates_rejected},
            "expected_cost": self.expected_cost.tolist(),
            "costs_measured": self.costs_measured.tolist(),
            "last_context": self.last_context,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; ValueError (nothing changed) for other actions, features or layout."""
        if list(state.get("actions", ())) != list(self.actions) or list(state.get("features", ())) != list(self.features):
            raise ValueError(f"state is for actions {state.get('actions')} and features {state.get('features')}, "
                             f"this model has {list(self.actions)} and {list(self.features)}")
        expected_cost = np.array(state["expected_cost"], np.float64)
        costs_measured = np.array(state["costs_measured"], np.float64)
        replay = self.replay
        if self._shards is None:  # into a new buffer: a bad state leaves this core as it was
            buffer = self._new_buffer()
            buffer.load_state_dict(state["buffer"])
            replay = ShardedReplay([buffer], seed=self.config.seed)
        self.model.load_state_dict(state["model"])
        self.replay = replay
        calls = state.get("sample_calls")
        if calls is None and self._shards is None:  # a checkpoint from before sharding: the buffer counted them
            calls = state["buffer"]["num_sample_calls"]
        self.replay.num_sample_calls = calls if calls is not None else self.replay.num_sample_calls
        counters = state["counters"]
        self.inserted = counters["inserted"]
        self.sampled = counters["sampled"]
        self.updates_applied = counters["updates_applied"]
        self.updates_rejected = counters["updates_rejected"]
        self.expected_cost, self.costs_measured = expected_cost, costs_measured
        self.last_context = state.get("last_context")


def _phi_names(bins: ContextBins | None, features: Sequence[str]) -> list[str]:
    """A name per entry of phi(x), as the report labels theta."""
    return ["intercept", *features] if bins is None else bins.names(features)


def policy_from_report(report: Mapping[str, Any]) -> ValueSnapshot:
    """The acting policy of a `LearningCore.model_report` (e.g. fetched over HTTP), to score offline."""
    actions, features = report["actions"], report["features"]
    binned = report.get("context_bins")
    bins = None
    if binned is not None:
        bins = (ContextBins.unset(len(features), binned["bins"]) if binned["edges"] is None
                else ContextBins(np.array([binned["edges"][name] for name in features], np.float64)))
    theta = np.array([[report["theta"][a][name] for name in _phi_names(bins, features)] for a in actions])
    return ValueSnapshot(
        version=report["policy_version"], theta=theta,
        pooled=np.array([report["pooled"][a] for a in actions]),
        seen=np.array([report["experiences_per_action"][a] for a in actions]),
        preferred=tuple(actions.index(a) for a in report["preferred_over_default"]),
        default_action=actions.index(report["default_action"]), margin=report["margin"],
        open_actions=tuple(i for i, a in enumerate(actions) if report["gates"][a]["open"]),
        epsilon=report["exploration_rate"], tau=report["tau"], bins=bins,
    )
