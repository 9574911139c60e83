"""Rollout stages, gates and per-arm window statistics (pure Python/numpy, no Ray).

The guard compares the treatment arm with control over a sliding window: error rate, p95
latency increase, replica memory and the difference of mean reward from feedback, with a 95%
confidence interval and Welch's test for whether that difference is significant.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cluster.settings import FEATURE_FLAGS


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    treatment_weight: float
    treatment_flags: Mapping[str, bool]


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

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"no rollout stage named '{name}'; stages: {[s.name for s in self.stages]}")


def load_plan(path: str | None = None) -> RolloutPlan:
    """Parse the rollout YAML at `path` (default `configs/rollout.yaml`); errors name the problem."""
    text = (Path(path).read_text() if path
            else resources.files("configs").joinpath("rollout.yaml").read_text())
    raw = yaml.safe_load(text)
    stages = []
    for entry in raw["stages"]:
        unknown = set(entry.get("treatment_flags", {})) - set(FEATURE_FLAGS)
        if unknown:
            raise ValueError(f"stage '{entry['name']}' sets unknown flags {sorted(unknown)}")
        if not 0.0 <= float(entry["treatment_weight"]) <= 1.0:
            raise ValueError(f"stage '{entry['name']}': treatment_weight must be in [0, 1]")
        stages.append(Stage(entry["name"], float(entry["treatment_weight"]),
                            dict(entry.get("treatment_flags", {}))))
    if not stages or stages[0].treatment_weight != 0.0:
        raise ValueError("the first rollout stage must be a baseline with treatment_weight 0")
    return RolloutPlan(tuple(stages), Gates(**raw["gates"]), GuardSettings(**raw["guard"]))


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
    """Recent observations of one arm, trimmed to the last `window_s` seconds on read."""

    def __init__(self, window_s: float, max_items: int = 100_000):
        self.window_s = window_s
        self._requests: collections.deque[tuple[float, float, bool]] = collections.deque(maxlen=max_items)
        self._rewards: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_items)
        self._memory: dict[str, tuple[float, float]] = {}  # replica -> (time, MB)

    def record_request(self, at: float, latency_ms: float, error: bool) -> None:
        self._requests.append((at, latency_ms, error))

    def record_reward(self, at: float, reward: float) -> None:
        self._rewards.append((at, reward))

    def record_memory(self, at: float, replica: str, megabytes: float) -> None:
        self._memory[replica] = (at, megabytes)

    def rewards(self, now: float) -> np.ndarray:
        return np.array([r for t, r in self._rewards if t >= now - self.window_s])

    def summary(self, now: float) -> ArmSummary:
        since = now - self.window_s
        recent = [(latency, error) for t, latency, error in self._requests if t >= since]
        latencies = np.array([latency for latency, _ in recent])
        errors = sum(1 for _, error in recent if error)
        rewards = self.rewards(now)
        memory = [mb for t, mb in self._memory.values() if t >= since]
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


def stage_flags(base: Mapping[str, bool], stage: Stage) -> dict[str, bool]:
    """Treatment flags for a stage: the defaults with the stage's flags set on top."""
    return {**base, **stage.treatment_flags}

