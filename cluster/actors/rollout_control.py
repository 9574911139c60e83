"""`RolloutControl`: the named actor that owns live weights and flags, and guards the rollout.

Replicas poll `live_if_newer(version)` a few times a second, so a change reaches every replica
within a second with no restart. The ingress reports each request's arm, latency and outcome,
and rewards from feedback; a guard thread compares treatment with control over a sliding window
(`cluster.core.rollout`) and, after `failures_to_rollback` failed checks in a row, sets the
treatment to 0% by itself and records why.

A change (a rollback above all) never waits on PostgreSQL: it is applied in memory, replicas see
it on their next poll, and a background thread saves it, retrying while the database is down.
The constructor does not read the database either: until the stored state is loaded (on a thread
that retries) the defaults hold, control serving everyone, and changes made meanwhile are applied
again on top of the stored state once it arrives. So a rollback works with the database down,
and survives a restart of the actor once it is saved. Fault injection is in memory only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

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
from cluster.actors.persistence import connection, in_background, retry_until_done
from cluster.core.vocabulary import ARMS, Arm, FeatureFlags, parse_arm
from cluster.platform.database import run_blocking

ACTOR_NAME = "rollout_control"
_MAX_EVENTS = 50
_REPLICA_GONE_S = 5.0  # a replica that has not polled for this long is not listed

log = logging.getLogger(__name__)


class RolloutError(ValueError):
    """An operator request that cannot be carried out (unknown arm or flag, last stage, ...)."""


# What a change returns: the event to record and the new state (its version is set by `_applied`).
Change = Callable[[RolloutState], tuple[str, RolloutState]]


def _applied(state: RolloutState, change: Change, at: float) -> tuple[str, RolloutState]:
    """`change` applied to `state`: the event, and the new state with its event and next version."""
    event, new = change(state)
    events = (*state.events, RolloutEvent(at, event))[-_MAX_EVENTS:]
    return event, dataclasses.replace(new, version=state.version + 1, events=events)


class RolloutController:
    """The actor's body (`RolloutControl` below is it as a Ray actor); no call waits on the database."""

    def __init__(self, database_url: str, plan: RolloutPlan, default_flags: FeatureFlags,
                 allow_faults: bool):
        self._url = database_url
        self._plan = plan
        self._allow_faults = allow_faults
        self._lock = threading.Lock()  # never held across database I/O
        self._windows = self._new_windows()
        self._consecutive_failures = 0
        self._last_failures: list[str] = []
        self._state = RolloutState.initial(plan, default_flags)  # control serves everyone until loaded
        self._loaded = False
        self._pending: list[tuple[float, Change]] = []  # changes made before the stored state was loaded
        self._saved_version: int | None = None
        self._unsaved = threading.Event()
        self._replicas: dict[str, tuple[int, float]] = {}  # replica -> (live version it has, when it asked)
        in_background("rollout-guard", self._guard_loop)
        in_background("rollout-store", self._load_then_save)

    def _new_windows(self) -> dict[Arm, ArmWindow]:
        return {arm: ArmWindow(self._plan.guard.window_s, opened_at=time.time()) for arm in ARMS}

    # -- persistence (background) ----------------------------------------------------------
    def _load_then_save(self) -> None:
        retry_until_done("loading the rollout state", lambda: self._adopt(run_blocking(self._load())))
        while True:
            self._unsaved.wait()
            self._unsaved.clear()
            retry_until_done("saving the rollout state", self._save_latest)

    async def _load(self) -> RolloutState | None:
        """The stored state; None when there is none, or none this code can read (the defaults hold)."""
        async with connection(self._url) as conn:
            raw = await conn.fetchval("SELECT state FROM rollout_state WHERE singleton")
        if raw is None:
            return None
        try:
            return RolloutState.from_json(json.loads(raw))
        except (KeyError, TypeError, ValueError) as error:
            log.warning("stored rollout state not readable; starting from the defaults", extra={"error": repr(error)})
            return None

    def _adopt(self, stored: RolloutState | None) -> None:
        """Take the stored state, with the changes made before it was loaded applied on top.

        Its version moves past every version handed out meanwhile, so each replica notices.
        """
        with self._lock:
            old, state = self._state, self._state
            if stored is not None:
                state = dataclasses.replace(stored, version=max(stored.version, old.version), faults=old.faults)
                for at, change in self._pending:
                    try:
                        state = _applied(state, change, at)[1]
                    except RolloutError as error:
                        log.warning("a change made before the rollout state was loaded no longer applies",
                                    extra={"error": str(error)})
            self._install(old, state)
            self._loaded = True
            if self._pending:
                self._unsaved.set()
            else:
                self._saved_version = state.version
            self._pending.clear()
        log.info("rollout state loaded", extra={"version": state.version, "stored": stored is not None})

    def _save_latest(self) -> None:
        with self._lock:
            state = self._state
        run_blocking(self._save(state))
        with self._lock:
            self._saved_version = state.version

    async def _save(self, state: RolloutState) -> None:
        async with connection(self._url) as conn:
            await conn.execute(
                "INSERT INTO rollout_state (singleton, state, updated_at) VALUES (true, $1::jsonb, now()) "
                "ON CONFLICT (singleton) DO UPDATE SET state = excluded.state, updated_at = now()",
                json.dumps(state.to_json()),
            )

    # -- changes ---------------------------------------------------------------------------
    def _change(self, change: Change) -> LiveConfig:
        """Apply `change` in memory now, and have it saved in the background.

        The new state is built from the current one inside the lock, so an operator's call and a
        guard rollback that race cannot overwrite each other. Replicas see it on their next poll,
        whether or not the database is up.
        """
        at = time.time()
        with self._lock:
            old = self._state
            event, new = _applied(old, change, at)
            self._install(old, new)
            if self._loaded:
                self._unsaved.set()
            else:  # replayed on the stored state once it is loaded
                self._pending.append((at, change))
        log.log(logging.WARNING if event.startswith("rolled back") else logging.INFO, "rollout change: %s", event)
        return new.live

    def _install(self, old: RolloutState, new: RolloutState) -> None:
        """Make `new` current (lock held). A change to what the treatment serves (its share or its
        flags) starts the guard's windows afresh: the gates judge the configuration that is live,
        not observations of one that was replaced."""
        self._state = new
        if new.treatment_weight != old.treatment_weight:
            self._consecutive_failures = 0
        if new.treatment_weight > 0 and (new.treatment_weight, new.flags) != (old.treatment_weight, old.flags):
            self._windows = self._new_windows()

    # -- what replicas call ----------------------------------------------------------------
    def live_if_newer(self, version: int, replica: str | None = None) -> LiveConfig | None:
        """The live config if it differs from `version` (what `replica` has), else None.

        Until the stored state is loaded, a replica that has a config (version > 0) keeps it,
        unless a change (a rollback) was made meanwhile; a new one gets the defaults.
        """
        with self._lock:
            if replica is not None:
                self._replicas[replica] = (version, time.monotonic())
            current = self._state
            if current.version == version or (version > 0 and not self._loaded and not self._pending):
                return None
            return current.live

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
        """The state, per-arm window summaries, the reward comparison, the guard, whether the state is
        loaded and saved, and the live version each replica polling now has, as JSON."""
        now, monotonic = time.time(), time.monotonic()
        with self._lock:
            summaries = {arm: self._windows[arm].summary(now) for arm in ARMS}
            for replica in [r for r, (_, seen) in self._replicas.items() if monotonic - seen > _REPLICA_GONE_S]:
                del self._replicas[replica]
            return {
                **self._state.to_json(),
                "faults": {arm.value: failing for arm, failing in self._state.faults.items()},
                "store": {"loaded": self._loaded, "saved": self._saved_version == self._state.version},
                "replicas": {replica: version for replica, (version, _) in sorted(self._replicas.items())},
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


RolloutControl = ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0)(RolloutController)
