"""The ingress deployment: the HTTP API, API-key checks, sticky A/B routing, and reporting.

Each search goes to the arm `serve_app.router` assigns the caller under the live weights: the
caller is the API key, or the user the request names when the key has the `name_users` scope.
Its latency and whether the arm failed it are batched to `RolloutControl`, which guards the
treatment. The actors come in through `.bind()` (created once, in `cluster.actors.start`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException

from cluster.actors.start import ClusterActors
from cluster.core.rate_limit import RateLimiter
from cluster.core.rollout import LiveConfig, Observation
from cluster.core.vocabulary import ARMS, NAME_USERS, Arm, Flag
from cluster.platform.api_keys import ApiKeyVerifier, Principal
from cluster.platform.database import (
    DATABASE_DOWN,
    DatabaseUnavailable,
    create_pool,
    unavailable_on_connection_errors,
)
from cluster.platform.edge import current_request_id, describe
from cluster.platform.errors import DeadlineExceeded, ServiceUnavailable
from cluster.platform.log import configure_logging
from cluster.platform.metrics import IngressMetrics, report_memory_every
from cluster.platform.settings import Settings
from serve_app.api import Caller, Health, create_api
from serve_app.feedback import FeedbackStore
from serve_app.live_config import live_config
from serve_app.pipeline import SearchEvent
from serve_app.replica_health import check_alive
from serve_app.router import caller_key, choose_arm
from serve_app.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    RankRequest,
    RankResponse,
    SearchRequest,
    SearchResponse,
)

_PING_TIMEOUT_S = 2.0  # /health's wait for each arm, actor and the database
_ACTOR_TIMEOUT_S = 2.0
_OBSERVATION_FLUSH_S = 0.5
_POLICY_CHANGE_TIMEOUT_S = 60.0  # judging a candidate on thousands of logged searches takes seconds
_LOG_WRITE_S = 1.0  # slack for the experience log's batch write, after its flush interval

log = logging.getLogger(__name__)
T = TypeVar("T")
_ARM_UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)  # a 503, not the arm's error
# Failures a search's arm did not cause: a shared dependency down, or the caller's own bad value
# reaching PostgreSQL (SQLSTATE class 22). They do not count against the arm in the guard.
_NOT_THE_ARMS_FAULT = (DatabaseUnavailable, asyncpg.DataError)


class ArmUnavailable(ServiceUnavailable):
    """The arm's replicas are dead or overloaded (a 503 that counts against the arm)."""

    retry_after_s = 2  # a replica restarts in seconds


class ActorUnavailable(ServiceUnavailable):
    """A control actor is restarting or busy past the timeout."""

    retry_after_s = 2


def _arm_unavailable(arm: Arm, error: Exception) -> ArmUnavailable:
    """A safe message; Ray's own (pid, IP, traceback) stays the `__cause__`, for the log."""
    return ArmUnavailable(f"the '{arm}' arm is unavailable (restarting or overloaded); retry shortly")


def _arm_failed(error: Exception) -> bool:
    """Whether a failed search counts against its arm: a server-side failure of the arm itself.

    Not a 4xx nor a failure of something both arms share, so no caller can steer the guard with
    bad requests, and a database outage does not roll the treatment back.
    """
    if isinstance(error, ArmUnavailable):
        return True
    if isinstance(error, HTTPException):
        return error.status_code >= 500
    return not isinstance(error, _NOT_THE_ARMS_FAULT)


@serve.deployment  # replicas and resources: configs/serve.yaml
@serve.ingress()
class Ingress:
    async def __init__(self, settings: Settings, arms: dict[Arm, DeploymentHandle], actors: ClusterActors):
        url = settings.database.url
        assert url, "the database URL is resolved before deployment"
        configure_logging(settings.log_level)  # JSON lines with request ids in the replica's log, not Ray's text
        self._environment = settings.environment
        report_memory_every("ingress")
        self._max_body_bytes = settings.http.max_body_bytes
        self._max_candidate_bytes = settings.http.max_candidate_bytes
        self._deadline_s = settings.http.request_timeout_s
        self._limiter = RateLimiter(settings.http.rate_limit_per_s, settings.http.rate_limit_burst)
        self._pool = await create_pool(url, settings.database)
        self._verifier = ApiKeyVerifier(self._pool, settings.http.api_key_cache_s)
        self._cost_weight = settings.learning.core.cost_weight
        # A search reaches the database at most a deadline, then a log flush and write, after its id.
        in_flight_s = self._deadline_s + settings.learning.experience_flush_s + _LOG_WRITE_S
        self._feedback = FeedbackStore(self._pool, self._cost_weight, self._rank_every_action, in_flight_s)
        self._arms = arms
        self._actions = [action.name for action in settings.retrieval.actions]
        self._control = actors.rollout_control
        self._learning = actors.learning_state
        self._learners = actors.learner_driver
        self._live = live_config(self._control, settings.rollout.live_refresh_s)
        self._observations: list[Observation] = []
        self._metrics = IngressMetrics()
        self._background = [asyncio.create_task(self._live.run(), name="live config"),
                            asyncio.create_task(self._flush_observations(), name="observations")]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self._verifier, max_body_bytes=self._max_body_bytes, operations=self,
                          limiter=self._limiter, max_candidate_bytes=self._max_candidate_bytes)

    async def check_health(self) -> None:
        """Serve's periodic check: this replica's own pool and loops (`serve_app.replica_health`)."""
        check_alive(self._pool, self._background)

    # -- routing ---------------------------------------------------------------------------
    def _arm_for(self, principal: Principal, caller: Caller) -> Arm:
        """The caller's arm: by the key's identity, or by `X-User-Id` when the key may name users
        (a front end serving many users); any other key's `X-User-Id` is ignored."""
        live = self._live.current
        weight = live.treatment_weight if live else 0.0
        key = caller_key(principal.key_id, caller.user_id, NAME_USERS in principal.scopes)
        return choose_arm(key, {Arm.TREATMENT: weight})

    @staticmethod
    async def _from_arm(arm: Arm, call: Awaitable[T]) -> T:
        """Await an arm's answer; a dead or overloaded arm is a 503, its own errors pass through."""
        try:
            return await call
        except _ARM_UNAVAILABLE as error:
            raise _arm_unavailable(arm, error) from error

    async def _within_deadline(self, arm: Arm, send: Callable[[], DeploymentResponse]) -> Any:
        """The arm's answer to the request `send` makes, or `DeadlineExceeded` (504) once the
        request deadline passes, with the arm's work cancelled (its queries, its provider calls).

        A replica that dies with the request (killed, out of memory) is not the caller's problem:
        the request is sent once more, and Serve routes it to a live replica if the arm has one.
        """
        scope = asyncio.timeout(self._deadline_s)
        response = send()
        try:
            async with scope:
                try:
                    return await self._from_arm(arm, response)
                except ArmUnavailable as error:
                    if not isinstance(error.__cause__, RayActorError):
                        raise
                    log.warning("arm replica died with a request; sending it once more", extra={"arm": arm})
                    response = send()
                    return await self._from_arm(arm, response)
        except TimeoutError:
            if not scope.expired():  # the arm's own time-out, not ours
                raise
            response.cancel()
            raise _deadline_exceeded(self._deadline_s) from None

    async def search(self, request: SearchRequest, principal: Principal, caller: Caller) -> SearchResponse:
        arm = self._arm_for(principal, caller)
        started = time.perf_counter()
        try:
            response = await self._within_deadline(
                arm, lambda: self._arms[arm].search.remote(request, caller.session_id))
        except Exception as error:  # a caller who went away cancels: no observation at all
            self._observe(arm, started, _arm_failed(error))
            raise
        self._observe(arm, started, False)
        return response

    async def search_events(self, request: SearchRequest, principal: Principal,
                            caller: Caller) -> AsyncIterator[SearchEvent]:
        arm = self._arm_for(principal, caller)
        started = time.perf_counter()
        stream = self._arms[arm].options(stream=True).search_events.remote(request, caller.session_id)
        deadline = time.monotonic() + self._deadline_s
        try:
            while True:  # the deadline bounds the whole stream; past its start, it ends with an error event
                try:
                    event = await asyncio.wait_for(anext(stream), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if time.monotonic() < deadline:  # the arm's own time-out, not ours
                        raise
                    raise _deadline_exceeded(self._deadline_s) from None
                yield event
        except _ARM_UNAVAILABLE as error:
            self._observe(arm, started, True)
            raise _arm_unavailable(arm, error) from error
        except Exception as error:  # not GeneratorExit or CancelledError: the caller going away is not observed
            self._observe(arm, started, _arm_failed(error))
            raise
        else:
            self._observe(arm, started, False)
        finally:
            stream.cancel()  # stops the arm's search, and its provider calls, if it is still running

    def _observe(self, arm: Arm, started: float, failed: bool) -> None:
        self._observations.append(Observation(arm, time.time(), (time.perf_counter() - started) * 1000, failed))
        self._metrics.requests.inc(tags={"arm": arm})
        if failed:
            self._metrics.errors.inc(tags={"arm": arm})

    async def _flush_observations(self) -> None:
        """Hand request observations to the guard in batches; never on the request path."""
        while True:
            await asyncio.sleep(_OBSERVATION_FLUSH_S)
            live = self._live.current
            if live:
                self._metrics.rollout_weight.set(live.treatment_weight, tags={"arm": Arm.TREATMENT})
                self._metrics.rollout_weight.set(1 - live.treatment_weight, tags={"arm": Arm.CONTROL})
            batch, self._observations = self._observations, []
            if batch:
                self._control.observe.remote(batch)

    async def rank(self, request: RankRequest, principal: Principal) -> RankResponse:
        return await self._within_deadline(Arm.CONTROL, lambda: self._arms[Arm.CONTROL].ranked.remote(request))

    # -- learning --------------------------------------------------------------------------
    async def _rank_every_action(self, arm: str, query: str, depth: int) -> tuple[list[float], list[tuple[list[str], float]]]:
        """Every action's ids and CPU ms for a query, ranked by the arm that served it."""
        context, outcomes = await self._from_arm(Arm(arm), self._arms[Arm(arm)].every_action.remote(query, depth))
        return context, [(ids, cost.cpu_ms) for ids, cost in outcomes]

    async def feedback(self, request: FeedbackRequest, principal: Principal) -> FeedbackResponse:
        outcome = await self._feedback.record(request)
        if outcome.searches:
            self._control.observe_reward.remote(Arm(outcome.arm), outcome.quality)
        for head, searches in (("retrieval", outcome.searches), ("answer", outcome.answer_searches)):
            if not searches:
                continue
            try:  # the row is stored; a restarting actor replays it from the database
                await asyncio.wait_for(self._learning.add.remote(head, searches), _ACTOR_TIMEOUT_S)
            except Exception as error:
                log.warning("experience not handed to the learning actor", extra={"head": head, "error": repr(error)})

        def by_action(values: list[float] | None) -> dict[str, float] | None:
            return None if values is None else dict(zip(self._actions, values, strict=True))

        return FeedbackResponse(
            search_id=outcome.search_id, reward=outcome.quality, cost_cpu_ms=outcome.cost_cpu_ms,
            duplicate=outcome.duplicate, answer_rating=outcome.answer_rating,
            action_quality=by_action(outcome.action_quality), action_rewards=by_action(outcome.action_rewards),
        )

    async def _ask(self, *calls: Awaitable[Any], timeout_s: float = _ACTOR_TIMEOUT_S, after: str = "") -> list[Any]:
        """Await actor calls with a timeout; an absent actor is a 503 that says it comes back
        (and `after`, what the caller should know about a call that may have run)."""
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), timeout_s)
        except (RayActorError, TimeoutError) as error:
            raise ActorUnavailable(
                f"a control actor is unavailable; it restarts by itself, retry shortly{after}"
            ) from error

    async def learning(self) -> dict[str, Any]:
        state, models, learners = await self._ask(
            self._learning.stats.remote(), self._learning.model.remote(), self._learners.stats.remote())
        averages = await self._feedback.action_averages(self._actions)
        return {"state": state, "learners": learners, "model": models["retrieval"], "answer_model": models["answer"],
                "cost_weight": self._cost_weight, "graded_averages": averages}

    async def reset_learning(self) -> dict[str, Any]:
        (version,) = await self._ask(self._learning.reset.remote())
        log.warning("learning reset by an operator", extra={"policy_version": version})
        return {"policy_version": version, "reset": True}

    # -- policy promotion (admin scope) ------------------------------------------------------
    async def _change_policy(self, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        (change,) = await self._ask(call, timeout_s=_POLICY_CHANGE_TIMEOUT_S,
                                    after="; nothing was changed unless `dtrag policy history` lists it")
        return change

    async def promote_policy(self, candidate: bytes, principal: Principal, force: bool) -> dict[str, Any]:
        return await self._change_policy(self._learning.promote.remote(candidate, principal.key_id, force))

    async def rollback_policy(self, principal: Principal) -> dict[str, Any]:
        return await self._change_policy(self._learning.rollback_policy.remote(principal.key_id))

    async def policy_history(self, limit: int) -> list[dict[str, Any]]:
        async with unavailable_on_connection_errors("policy history"):
            rows = await self._pool.fetch(
                "SELECT id, at, change, head, candidate, key_id, forced, policy_version, previous_version, "
                "judgement, undone_by FROM policy_changes ORDER BY id DESC LIMIT $1", limit)
        return [{**dict(row), "at": row["at"].isoformat(),
                 "judgement": None if row["judgement"] is None else json.loads(row["judgement"])} for row in rows]

    # -- operations (admin scope) ----------------------------------------------------------
    async def flags(self) -> dict[str, Any]:
        (live,) = await self._ask(self._control.live_if_newer.remote(-1))
        return {"arms": _flags_json(live), "version": live.version,
                "behaviour": {flag.value: flag.behaviour or "no behaviour yet" for flag in Flag}}

    async def set_flags(self, arm: Arm, flags: dict[str, bool]) -> dict[str, Any]:
        (live,) = await self._ask(self._control.set_flags.remote(arm, flags))
        return {"arms": _flags_json(live), "version": live.version}

    async def rollout_status(self) -> dict[str, Any]:
        (status,) = await self._ask(self._control.status.remote())
        return status

    async def advance(self) -> dict[str, Any]:
        await self._ask(self._control.advance.remote())
        return await self.rollout_status()

    async def rollback(self, reason: str) -> dict[str, Any]:
        await self._ask(self._control.rollback.remote(reason))
        return await self.rollout_status()

    async def set_weight(self, weight: float) -> dict[str, Any]:
        await self._ask(self._control.set_weight.remote(weight))
        return await self.rollout_status()

    async def set_fault(self, arm: Arm, failing: bool) -> dict[str, Any]:
        await self._ask(self._control.set_fault.remote(arm, failing))
        return await self.rollout_status()

    # -- health ----------------------------------------------------------------------------
    @staticmethod
    async def _answers(what: str, call: Awaitable[Any]) -> bool:
        """Whether `call` (a cheap request to an arm or actor) is answered in time."""
        try:
            await asyncio.wait_for(call, _PING_TIMEOUT_S)
            return True
        except Exception as error:  # any failure means "not ready"; /health reports, never raises
            log.info("health: %s is not ready", what,
                     extra={"request_id": current_request_id(), "detail": describe(error)})
            return False

    async def health(self) -> Health:
        """Each arm (its replicas answer and reach the database), each actor, and the database."""
        database_error = None
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S):
                await self._pool.fetchval("SELECT 1")
        except Exception as error:  # /health reports every failure, never raises
            log.warning("health: database check failed",
                        extra={"request_id": current_request_id(), "detail": describe(error)})
            database_error = DATABASE_DOWN
        actors = {"rollout_control": self._control.live_if_newer.remote(self._live.version),
                  "learning_state": self._learning.stats.remote(),
                  "learner_driver": self._learners.stats.remote()}
        arms = {arm.value: self._arms[arm].ping.remote() for arm in ARMS}
        checks = {**{f"arm {name}": call for name, call in arms.items()},
                  **{f"actor {name}": call for name, call in actors.items()}}
        ready = dict(zip(checks, await asyncio.gather(*(self._answers(what, call) for what, call in checks.items())),
                         strict=True))
        return Health(
            environment=self._environment,
            database_ready=database_error is None,
            database_error=database_error,
            cluster={name: ready[f"arm {name}"] for name in arms},
            actors={name: ready[f"actor {name}"] for name in actors},
        )


def _deadline_exceeded(deadline_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the search did not finish within the {deadline_s:g} s deadline "
                            "(DTRAG_REQUEST_TIMEOUT_S) and was cancelled; retry, or simplify the request")


def _flags_json(live: LiveConfig) -> dict[str, dict[str, bool]]:
    return {arm.value: flags.as_dict() for arm, flags in live.flags.items()}
