"""`RolloutControl`: the named actor that owns live weights and flags, and guards the rollout.

Replicas poll `live_if_newer(version)` a few times a second, so a change reaches every replica
within a second with no restart. The ingress reports each request's arm, latency and outcome,
and rewards from feedback; a guard thread compares treatment with control over a sliding window
(`cluster.core.rollout`) and, after `failures_to_rollback` failed checks in a row, sets the
treatment to 0% by itself and records why. State is saved to PostgreSQL on every change and
restored on restart, so a rollback survives the actor.
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

from cluster.core.rollout import (
    ArmWindow,
    LiveConfig,
    Observation,
    RolloutEvent,
    RolloutPlan,
    RolloutState,
    RewardComparison,
    compare_rewards,
    gate_failures,
)
from cluster.core.vocabulary import ARMS, Arm, FeatureFlags, parse_arm
from cluster.platform.database import run_blocking

ACTOR_NAME = "rollout_control"
_MAX_EVENTS = 50

log = logging.getLogger(__name__)


class RolloutError(ValueError):
    """An operator request that cannot be carried out (unknown arm or flag, last stage, ...)."""


# What a change returns: the event to record and the new state (its version is set by `_change`).
Change = Callable[[RolloutState], tuple[str, RolloutState]]


@ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0)
class RolloutControl:
    def __init__(self, database_url: str, plan: RolloutPlan, default_flags: FeatureFlags,
                 allow_faults: bool):
        self._url = database_url
        self._plan = plan
        self._allow_faults = allow_faults
        self._lock = threading.Lock()
        self._windows = self._new_windows()
        self._consecutive_failures = 0
        self._last_failures: list[str] = []
        saved = run_blocking(self._load())
        self._state = saved or RolloutState.initial(plan, default_flags)
        threading.Thread(target=self._guard_loop, daemon=True).start()

    def _new_windows(self) -> dict[Arm, ArmWindow]:
        return {arm: ArmWindow(self._plan.guard.window_s) for arm in ARMS}

    # -- persistence -----------------------------------------------------------------------
    async def _load(self) -> RolloutState | None:
        connection = await asyncpg.connect(self._url)
        try:
            raw = await connection.fetchval("SELECT state FROM rollout_state WHERE singleton")
        finally:
            await connection.close()
        return None if raw is None else RolloutState.from_json(json.loads(raw))

    async def _save(self, state: RolloutState) -> None:
        connection = await asyncpg.connect(self._url)
        try:
            await connection.execute(
                "INSERT INTO rollout_state (singleton, state, updated_at) VALUES (true, $1::jsonb, now()) "
                "ON CONFLICT (singleton) DO UPDATE SET state = excluded.state, updated_at = now()",
                json.dumps(state.to_json()),
            )
        finally:
            await connection.close()

    def _change(self, change: Change) -> LiveConfig:
        """Apply `change`, bump the version, record the event, persist.

        The new state is built from the current one inside the lock, so an operator's call and a
        guard rollback that race cannot overwrite each other. A change to what the treatment
        serves (its share or its flags) starts the guard's windows afresh: the gates judge the
        configuration that is live, not observations of one that was replaced.
        """
        with self._lock:
            old = self._state
            event, new = change(old)
            events = (*old.events, RolloutEvent(time.time(), event))[-_MAX_EVENTS:]
            new = dataclasses.replace(new, version=old.version + 1, events=events)
            run_blocking(self._save(new))
            self._state = new
            if new.treatment_weight != old.treatment_weight:
                self._consecutive_failures = 0
            if new.treatment_weight > 0 and (new.treatment_weight, new.flags) != (old.treatment_weight, old.flags):
                self._windows = self._new_windows()
            log.log(logging.WARNING if event.startswith("rolled back") else logging.INFO,
                    "rollout change: %s", event)
            return new.live

    # -- what replicas call ----------------------------------------------------------------
    def live_if_newer(self, version: int) -> LiveConfig | None:
        with self._lock:
            return None if self._state.version == version else self._state.live

    def observe(self, observations: list[Observation]) -> None:
        with self._lock:
            for o in observations:
                self._windows[o.arm].record_request(o.at, o.latency_ms, o.error)

    def observe_reward(self, arm: Arm, reward: float) -> None:
        with self._lock:
            self._windows[arm].record_reward(time.time(), reward)

    def observe_memory(self, arm: Arm, replica: str, megabytes: float) -> None:
        with self._lock:
            self._windows[arm].record_memory(time.time(), replica, megabytes)

    # -- what operators call ---------------------------------------------------------------
    def set_flags(self, arm: str, flags: Mapping[str, bool]) -> LiveConfig:
        try:
            target = parse_arm(arm)
            FeatureFlags.from_mapping(flags)  # names checked before anything changes
        except ValueError as error:
            raise RolloutError(str(error)) from None
        changes = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in flags.items())
        return self._change(lambda s: (
            f"flags on {target}: {changes}",
            dataclasses.replace(s, flags={**s.flags, target: s.flags[target].with_changes(flags)})))

    def set_weight(self, weight: float, reason: str = "set by operator") -> LiveConfig:
        if not 0.0 <= weight <= 1.0:
            raise RolloutError(f"treatment weight must be in [0, 1], got {weight}")
        return self._change(lambda s: (
            f"treatment weight {s.treatment_weight:.0%} -> {weight:.0%}: {reason}",
            dataclasses.replace(s, treatment_weight=weight)))

    def advance(self) -> LiveConfig:
        def next_stage(state: RolloutState) -> tuple[str, RolloutState]:
            try:
                stage = self._plan.next_stage(state.stage)
            except ValueError as error:
                raise RolloutError(str(error)) from None
            flags = {**state.flags,
                     Arm.TREATMENT: state.flags[Arm.CONTROL].with_changes(stage.treatment_flags)}
            return (f"advanced to stage '{stage.name}' ({stage.treatment_weight:.0%})",
                    dataclasses.replace(state, stage=stage.name, treatment_weight=stage.treatment_weight,
                                        flags=flags))

        return self._change(next_stage)

    def rollback(self, reason: str) -> LiveConfig:
        return self._change(lambda s: (f"rolled back to 0%: {reason}",
                                       dataclasses.replace(s, treatment_weight=0.0, rolled_back=reason)))

    def set_fault(self, arm: str, failing: bool) -> LiveConfig:
        if not self._allow_faults:
            raise RolloutError("fault injection is available only when ENVIRONMENT=test")
        try:
            target = parse_arm(arm)
        except ValueError as error:
            raise RolloutError(str(error)) from None
        return self._change(lambda s: (f"fault injection on {target}: {'on' if failing else 'off'}",
                                       dataclasses.replace(s, faults={**s.faults, target: failing})))

    def status(self) -> dict[str, Any]:
        """The state, per-arm window summaries, the reward comparison and the guard, as JSON."""
        now = time.time()
        with self._lock:
            summaries = {arm: self._windows[arm].summary(now) for arm in ARMS}
            return {
                **self._state.to_json(),
                "stages": [s.name for s in self._plan.stages],
                "arms": {arm.value: summary.as_dict() for arm, summary in summaries.items()},
                "reward_difference": dataclasses.asdict(rewards) if (rewards := self._rewards(now)) else None,
                "guard": {"consecutive_failures": self._consecutive_failures,
                          "failures_to_rollback": self._plan.guard.failures_to_rollback,
                          "last_failures": self._last_failures,
                          "window_s": self._plan.guard.window_s},
            }

    # -- the guard -------------------------------------------------------------------------
    def _rewards(self, now: float) -> RewardComparison | None:
        return compare_rewards(self._windows[Arm.CONTROL].rewards(now), self._windows[Arm.TREATMENT].rewards(now))

    def check_gates(self) -> list[str]:
        """One guard check; rolls back after enough consecutive failures. Returns the failures."""
        now = time.time()
        with self._lock:
            if self._state.treatment_weight == 0.0:
                self._consecutive_failures, self._last_failures = 0, []
                return []
            control, treatment = (self._windows[a].summary(now) for a in ARMS)
            failures = gate_failures(self._plan.gates, self._plan.guard, control, treatment, self._rewards(now))
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
