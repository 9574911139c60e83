"""`RolloutControl`: the named actor that owns live weights and flags, and guards the rollout.

Replicas poll `live_if_newer(version)` a few times a second, so a change reaches every replica
within a second with no restart. The ingress reports each request's arm, latency and outcome,
and rewards from feedback; a guard thread compares treatment with control over a sliding window
(`cluster.rollout`) and, after `failures_to_rollback` failed checks in a row, sets the treatment
to 0% by itself and records why. State is saved to PostgreSQL on every change and restored on
restart, so a rollback survives the actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import ray

from cluster.database import run_blocking
from cluster.rollout import (
    ArmWindow,
    RolloutPlan,
    compare_rewards,
    gate_failures,
    stage_flags,
)
from cluster.settings import FEATURE_FLAGS

NAMESPACE = "dtrag"
ACTOR_NAME = "rollout_control"
CONTROL, TREATMENT = "control", "treatment"
ARMS = (CONTROL, TREATMENT)
_MAX_EVENTS = 50

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LiveConfig:
    """What replicas act on: the treatment's share of callers and each arm's flags."""

    version: int
    stage: str
    treatment_weight: float
    flags: Mapping[str, Mapping[str, bool]]
    faults: Mapping[str, bool]


@dataclasses.dataclass(frozen=True)
class Observation:
    arm: str
    at: float
    latency_ms: float
    error: bool


class RolloutError(ValueError):
    """An operator request that cannot be carried out (unknown arm or flag, last stage, ...)."""


@ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0)
class RolloutControl:
    def __init__(self, database_url: str, plan: RolloutPlan, default_flags: Mapping[str, bool],
                 allow_faults: bool):
        self._url = database_url
        self._plan = plan
        self._allow_faults = allow_faults
        self._lock = threading.Lock()
        self._windows = {arm: ArmWindow(plan.guard.window_s) for arm in ARMS}
        self._consecutive_failures = 0
        self._last_failures: list[str] = []
        saved = run_blocking(self._load())
        if saved is None:
            baseline = plan.stages[0]
            saved = {"version": 1, "stage": baseline.name, "treatment_weight": baseline.treatment_weight,
                     "flags": {CONTROL: dict(default_flags), TREATMENT: stage_flags(default_flags, baseline)},
                     "faults": {arm: False for arm in ARMS}, "events": []}
        self._state: dict[str, Any] = saved
        threading.Thread(target=self._guard_loop, daemon=True).start()

    # -- persistence -----------------------------------------------------------------------
    async def _load(self) -> dict[str, Any] | None:
        connection = await asyncpg.connect(self._url)
        try:
            raw = await connection.fetchval("SELECT state FROM rollout_state WHERE singleton")
        finally:
            await connection.close()
        return None if raw is None else json.loads(raw)

    async def _save(self, state: dict[str, Any]) -> None:
        connection = await asyncpg.connect(self._url)
        try:
            await connection.execute(
                "INSERT INTO rollout_state (singleton, state, updated_at) VALUES (true, $1::jsonb, now()) "
                "ON CONFLICT (singleton) DO UPDATE SET state = excluded.state, updated_at = now()",
                json.dumps(state),
            )
        finally:
            await connection.close()

    def _change(self, change: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]) -> LiveConfig:
        """Apply `change(state) -> (event, updates)`, bump the version, record, persist.

        The updates are built from the state inside the lock, so an operator's call and a guard
        rollback that race cannot overwrite each other.
        """
        with self._lock:
            event, updates = change(self._state)
            state = {**self._state, **updates, "version": self._state["version"] + 1}
            state["events"] = [*self._state["events"], {"at": time.time(), "event": event}][-_MAX_EVENTS:]
            run_blocking(self._save(state))
            self._state = state
            if "treatment_weight" in updates:
                self._consecutive_failures = 0
            log.log(logging.WARNING if event.startswith("rolled back") else logging.INFO,
                    "rollout change: %s", event)
            return self._live()

    def _live(self) -> LiveConfig:
        s = self._state
        return LiveConfig(s["version"], s["stage"], s["treatment_weight"], s["flags"], s["faults"])

    # -- what replicas call ----------------------------------------------------------------
    def live_if_newer(self, version: int) -> LiveConfig | None:
        with self._lock:
            return None if self._state["version"] == version else self._live()

    def observe(self, observations: list[Observation]) -> None:
        with self._lock:
            for o in observations:
                self._windows[o.arm].record_request(o.at, o.latency_ms, o.error)

    def observe_reward(self, arm: str, reward: float) -> None:
        with self._lock:
            self._windows[arm].record_reward(time.time(), reward)

    def observe_memory(self, arm: str, replica: str, megabytes: float) -> None:
        with self._lock:
            self._windows[arm].record_memory(time.time(), replica, megabytes)

    # -- what operators call ---------------------------------------------------------------
    def set_flags(self, arm: str, flags: Mapping[str, bool]) -> LiveConfig:
        if arm not in ARMS:
            raise RolloutError(f"unknown arm '{arm}'; arms: {', '.join(ARMS)}")
        unknown = set(flags) - set(FEATURE_FLAGS)
        if unknown:
            raise RolloutError(f"unknown flags {sorted(unknown)}; flags: {', '.join(FEATURE_FLAGS)}")
        changes = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in flags.items())
        return self._change(lambda s: (
            f"flags on {arm}: {changes}", {"flags": {**s["flags"], arm: {**s["flags"][arm], **flags}}}))

    def set_weight(self, weight: float, reason: str = "set by operator") -> LiveConfig:
        if not 0.0 <= weight <= 1.0:
            raise RolloutError(f"treatment weight must be in [0, 1], got {weight}")
        return self._change(lambda s: (
            f"treatment weight {s['treatment_weight']:.0%} -> {weight:.0%}: {reason}",
            {"treatment_weight": weight}))

    def advance(self) -> LiveConfig:
        def next_stage(state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            names = [s.name for s in self._plan.stages]
            index = names.index(state["stage"])
            if index + 1 >= len(names):
                raise RolloutError(f"already at the last stage '{names[index]}'")
            stage = self._plan.stages[index + 1]
            flags = {**state["flags"], TREATMENT: stage_flags(state["flags"][CONTROL], stage)}
            return (f"advanced to stage '{stage.name}' ({stage.treatment_weight:.0%})",
                    {"stage": stage.name, "treatment_weight": stage.treatment_weight, "flags": flags})

        return self._change(next_stage)

    def rollback(self, reason: str) -> LiveConfig:
        return self._change(lambda s: (f"rolled back to 0%: {reason}",
                                       {"treatment_weight": 0.0, "rolled_back": reason}))

    def set_fault(self, arm: str, failing: bool) -> LiveConfig:
        if not self._allow_faults:
            raise RolloutError("fault injection is available only when ENVIRONMENT=test")
        if arm not in ARMS:
            raise RolloutError(f"unknown arm '{arm}'; arms: {', '.join(ARMS)}")
        return self._change(lambda s: (f"fault injection on {arm}: {'on' if failing else 'off'}",
                                       {"faults": {**s["faults"], arm: failing}}))

    def status(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            summaries = {arm: self._windows[arm].summary(now) for arm in ARMS}
            rewards = compare_rewards(self._windows[CONTROL].rewards(now), self._windows[TREATMENT].rewards(now))
            return {
                **dataclasses.asdict(self._live()),
                "rolled_back": self._state.get("rolled_back"),
                "stages": [s.name for s in self._plan.stages],
                "arms": {arm: summary.as_dict() for arm, summary in summaries.items()},
                "reward_difference": dataclasses.asdict(rewards) if rewards else None,
                "guard": {"consecutive_failures": self._consecutive_failures,
                          "failures_to_rollback": self._plan.guard.failures_to_rollback,
                          "last_failures": self._last_failures,
                          "window_s": self._plan.guard.window_s},
                "events": self._state["events"],
            }

    # -- the guard -------------------------------------------------------------------------
    def check_gates(self) -> list[str]:
        """One guard check; rolls back after enough consecutive failures. Returns the failures."""
        now = time.time()
        with self._lock:
            if self._state["treatment_weight"] == 0.0:
                self._consecutive_failures, self._last_failures = 0, []
                return []
            control, treatment = (self._windows[a].summary(now) for a in ARMS)
            rewards = compare_rewards(self._windows[CONTROL].rewards(now), self._windows[TREATMENT].rewards(now))
            failures = gate_failures(self._plan.gates, self._plan.guard, control, treatment, rewards)
            self._last_failures = failures
            self._consecutive_failures = self._consecutive_failures + 1 if failures else 0
            breached = self._consecutive_failures >= self._plan.guard.failures_to_rollback
        if breached:
            self.rollback(f"guard: {'; '.join(failures)} ({self._plan.guard.failures_to_rollback} checks in a row)")
        return failures

    def _guard_loop(self) -> None:
        while True:
            time.sleep(self._plan.guard.check_interval_s)
            try:
                self.check_gates()
            except Exception:  # keep guarding; the next check retries
                log.exception("guard check failed")


def get_or_create_control(database_url: str, plan: RolloutPlan, default_flags: Mapping[str, bool],
                          allow_faults: bool) -> ray.actor.ActorHandle:
    return RolloutControl.options(
        name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote(database_url, plan, dict(default_flags), allow_faults)


def control_handle() -> ray.actor.ActorHandle:
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
