"""Rollout stages and gates, the rollout state, and per-arm window statistics (pure Python/numpy).

The guard compares the treatment arm with control over a sliding window: error rate, p95
latency increase, replica memory and the difference of mean reward from feedback, with a 95%
confidence interval and Welch's test for whether that difference is significant.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cluster.core.vocabulary import ARMS, Arm, FeatureFlags


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    treatment_weight: float
    treatment_flags: Mapping[str, bool]  # set on top of control's flags


@dataclasses.dataclass(frozen=True)
class Gates:
    max_error_rate: float
    max_p95_increase_ms: float
    max_replica_memory_mb: float
    min_reward_delta: float


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    check_interval_s: float
    window_s: float
    failures_to_rollback: int
    min_requests: int
    min_rewards: int


@dataclasses.dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[Stage, ...]
    gates: Gates
    guard: GuardSettings

    def next_stage(self, name: str) -> Stage:
        names = [s.name for s in self.stages]
        index = names.index(name)
        if index + 1 >= len(names):
            raise ValueError(f"already at the last stage '{name}'")
        return self.stages[index + 1]


def parse_plan(raw: Mapping[str, Any]) -> RolloutPlan:
    """A plan from the parsed rollout YAML; ValueError names what is wrong."""
    stages = []
    for entry in raw["stages"]:
        flags = dict(entry.get("treatment_flags", {}))
        try:
            FeatureFlags.from_mapping(flags)
        except ValueError as error:
            raise ValueError(f"stage '{entry['name']}': {error}") from None
        if not 0.0 <= float(entry["treatment_weight"]) <= 1.0:
            raise ValueError(f"stage '{entry['name']}': treatment_weight must be in [0, 1]")
        stages.append(Stage(entry["name"], float(entry["treatment_weight"]), flags))
    if not stages or stages[0].treatment_weight != 0.0:
        raise ValueError("the first rollout stage must be a baseline with treatment_weight 0")
    return RolloutPlan(tuple(stages), Gates(**raw["gates"]), GuardSettings(**raw["guard"]))


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    """What replicas act on: the treatment's share of callers, each arm's flags and faults."""

    version: int
    stage: str
    treatment_weight: float
    flags: Mapping[Arm, FeatureFlags]
    faults: Mapping[Arm, bool]


@dataclasses.dataclass(frozen=True)
class RolloutEvent:
    at: float  # Unix time
    event: str


@dataclasses.dataclass(frozen=True)
class RolloutState(LiveConfig):
    """The rollout as the control actor owns and stores it; each change makes a new version."""

    events: tuple[RolloutEvent, ...] = ()
    rolled_back: str | None = None

    @classmethod
    def initial(cls, plan: RolloutPlan, default_flags: FeatureFlags) -> RolloutState:
        baseline = plan.stages[0]
        return cls(1, baseline.name, baseline.treatment_weight,
                   {Arm.CONTROL: default_flags,
                    Arm.TREATMENT: default_flags.with_changes(baseline.treatment_flags)},
                   {arm: False for arm in ARMS})

    @property
    def live(self) -> LiveConfig:
        """What replicas need, without the event history."""
        return LiveConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(LiveConfig)})

    def to_json(self) -> dict[str, Any]:
        """What is stored: everything but the faults, which are a drill's and never outlive the actor."""
        return {"version": self.version, "stage": self.stage, "treatment_weight": self.treatment_weight,
                "flags": {arm.value: flags.as_dict() for arm, flags in self.flags.items()},
                "events": [dataclasses.asdict(e) for e in self.events], "rolled_back": self.rolled_back}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RolloutState:
        """A stored state, with no fault injected (whatever an older row says)."""
        return cls(raw["version"], raw["stage"], raw["treatment_weight"],
                   {Arm(arm): FeatureFlags.from_mapping(flags) for arm, flags in raw["flags"].items()},
                   {arm: False for arm in ARMS},
                   tuple(RolloutEvent(**e) for e in raw["events"]), raw.get("rolled_back"))


@dataclasses.dataclass(frozen=True)
class Observation:
    """One routed search, as the ingress reports it to the guard."""

    arm: Arm
    at: float  # Unix time
    latency_ms: float
    error: bool


@dataclasses.dataclass(frozen=True)
class ArmSummary:
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    rewards: int
    mean_reward: float | None
    reward_ci95: tuple[float, float] | None
    max_memory_mb: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ArmWindow:
    """Recent observations of one arm, trimmed to the last `window_s` seconds on read.

    Requests and rewards from before `opened_at` are not counted: a batch that arrives late from
    the configuration this window replaced must not judge the one that is live.
    """

    def __init__(self, window_s: float, opened_at: float = 0.0, max_items: int = 100_000):
        self.window_s = window_s
        self.opened_at = opened_at
        self._requests: collections.deque[tuple[float, float, bool]] = collections.deque(maxlen=max_items)
        self._rewards: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_items)
        self._memory: dict[str, tuple[float, float]] = {}  # replica -> (time, MB)

    def record_request(self, at: float, latency_ms: float, error: bool) -> None:
        self._requests.append((at, latency_ms, error))

    def record_reward(self, at: float, reward: float) -> None:
        self._rewards.append((at, reward))

    def record_memory(self, at: float, replica: str, megabytes: float) -> None:
        self._memory[replica] = (at, megabytes)

    def _since(self, now: float) -> float:
        return max(now - self.window_s, self.opened_at)

    def rewards(self, now: float) -> np.ndarray:
        return np.array([r for t, r in self._rewards if t >= self._since(now)])

    def summary(self, now: float) -> ArmSummary:
        since = self._since(now)
        recent = [(latency, error) for t, latency, error in self._requests if t >= since]
        latencies = np.array([latency for latency, _ in recent])
        errors = sum(1 for _, error in recent if error)
        rewards = self.rewards(now)
        memory = [mb for t, mb in self._memory.values() if t >= now - self.window_s]  # the replica's, not the config's
        return ArmSummary(
            requests=len(recent),
            errors=errors,
            error_rate=errors / len(recent) if recent else 0.0,
            p50_ms=float(np.percentile(latencies, 50)) if len(latencies) else None,
            p95_ms=float(np.percentile(latencies, 95)) if len(latencies) else None,
            rewards=len(rewards),
            mean_reward=float(rewards.mean()) if len(rewards) else None,
            reward_ci95=_mean_ci95(rewards),
            max_memory_mb=max(memory) if memory else None,
        )


def _mean_ci95(values: np.ndarray) -> tuple[float, float] | None:
    if len(values) < 2:
        return None
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


@dataclasses.dataclass(frozen=True)
class RewardComparison:
    delta: float  # treatment mean minus control mean
    ci95: tuple[float, float]
    p_value: float
    significant: bool


def compare_rewards(control: np.ndarray, treatment: np.ndarray, alpha: float = 0.05) -> RewardComparison | None:
    """Welch's test of mean rewards (normal approximation: windows hold tens of rewards or more)."""
    if len(control) < 2 or len(treatment) < 2:
        return None
    delta = float(treatment.mean() - control.mean())
    se = math.sqrt(treatment.var(ddof=1) / len(treatment) + control.var(ddof=1) / len(control))
    if se == 0:
        p_value = 1.0 if delta == 0 else 0.0
    else:
        p_value = math.erfc(abs(delta / se) / math.sqrt(2))
    return RewardComparison(delta, (delta - 1.96 * se, delta + 1.96 * se), p_value, p_value < alpha)


def gate_failures(
    gates: Gates, guard: GuardSettings, control: ArmSummary, treatment: ArmSummary,
    rewards: RewardComparison | None,
) -> list[str]:
    """Why the treatment fails its gates now; empty when it passes (or is not yet judgeable)."""
    failures = []
    if treatment.requests >= guard.min_requests:
        if treatment.error_rate > gates.max_error_rate:
            failures.append(f"error rate {treatment.error_rate:.1%} > {gates.max_error_rate:.1%}")
        if control.requests >= guard.min_requests and treatment.p95_ms is not None and control.p95_ms is not None:
            increase = treatment.p95_ms - control.p95_ms
            if increase > gates.max_p95_increase_ms:
                failures.append(f"p95 latency +{increase:.0f} ms > +{gates.max_p95_increase_ms:.0f} ms")
    if treatment.max_memory_mb is not None and treatment.max_memory_mb > gates.max_replica_memory_mb:
        failures.append(f"replica memory {treatment.max_memory_mb:.0f} MB > {gates.max_replica_memory_mb:.0f} MB")
    if (rewards is not None and control.rewards >= guard.min_rewards and treatment.rewards >= guard.min_rewards
            and rewards.significant and rewards.delta < gates.min_reward_delta):
        failures.append(f"mean reward {rewards.delta:+.3f} < {gates.min_reward_delta:+.3f} (p={rewards.p_value:.3f})")
    return failures
