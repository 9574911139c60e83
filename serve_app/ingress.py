"""The ingress deployment: the HTTP API, API-key checks, sticky A/B routing, and reporting.

Each search goes to the arm `serve_app.router` assigns the caller under the live weights; its
latency and outcome are batched to the rollout control plane, which guards the treatment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.api_keys import ApiKeyVerifier, Principal
from cluster.control_plane import (
    ARMS,
    CONTROL,
    TREATMENT,
    LiveConfig,
    Observation,
    get_or_create_control,
)
from cluster.database import create_pool
from cluster.errors import ServiceUnavailable
from cluster.metrics import IngressMetrics
from cluster.rollout import load_plan
from cluster.settings import FLAG_BEHAVIOUR, STRATEGIES, Settings
from learners.learner import get_or_create_driver
from learners.learning_state import get_or_create_learning_state
from serve_app.api import Caller, Health, create_api
from serve_app.feedback import FeedbackStore
from serve_app.router import choose_arm
from serve_app.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    RankRequest,
    RankResponse,
    SearchRequest,
    SearchResponse,
)
from serve_app.versioned_cache import VersionedCache

_ARM_PING_TIMEOUT_S = 2.0
_ACTOR_TIMEOUT_S = 2.0
_OBSERVATION_FLUSH_S = 0.5

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    async def __init__(self, settings: Settings, arms: dict[str, DeploymentHandle]):
        url = settings.database.url
        assert url, "the database URL is resolved before deployment"
        self._settings = settings
        self._pool = await create_pool(url, settings.database)
        self._verifier = ApiKeyVerifier(self._pool, settings.http.api_key_cache_s)
        self._feedback = FeedbackStore(self._pool)
        self._arms = arms
        learning = settings.learning
        self._learning = get_or_create_learning_state(url, learning)
        self._learners = get_or_create_driver(self._learning, learning.learners, learning.batch_size)
        self._control = get_or_create_control(url, load_plan(settings.rollout.plan), settings.features,
                                              allow_faults=settings.environment == "test")
        self._live: VersionedCache[LiveConfig] = VersionedCache(
            self._control.live_if_newer.remote, settings.rollout.live_refresh_s)
        self._observations: list[Observation] = []
        self._metrics = IngressMetrics()
        self._background = [asyncio.create_task(self._live.run()),
                            asyncio.create_task(self._flush_observations())]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self._verifier, operations=self)

    # -- routing ---------------------------------------------------------------------------
    def _arm_for(self, principal: Principal, caller: Caller) -> str:
        live = self._live.current
        weight = live.treatment_weight if live else 0.0
        return choose_arm(caller.user_id or principal.key_id, {TREATMENT: weight})

    async def _call(self, arm: str, method: str, *args: object):
        """Call an arm; a dead or overloaded arm is a 503, its own errors pass through."""
        try:
            return await getattr(self._arms[arm], method).remote(*args)
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as error:
            raise ServiceUnavailable(f"arm '{arm}' is unavailable: {error}") from error

    async def search(self, request: SearchRequest, principal: Principal, caller: Caller) -> SearchResponse:
        arm = self._arm_for(principal, caller)
        started, failed = time.perf_counter(), True
        try:
            response = await self._call(arm, "search", request.q, request.final_topk, request.strategy,
                                        caller.session_id)
            failed = False
            return response
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            self._observations.append(Observation(arm, time.time(), latency_ms, failed))
            self._metrics.requests.inc(tags={"arm": arm})
            if failed:
                self._metrics.errors.inc(tags={"arm": arm})

    async def _flush_observations(self) -> None:
        """Hand request observations to the guard in batches; never on the request path."""
        while True:
            await asyncio.sleep(_OBSERVATION_FLUSH_S)
            live = self._live.current
            if live:
                self._metrics.rollout_weight.set(live.treatment_weight, tags={"arm": TREATMENT})
                self._metrics.rollout_weight.set(1 - live.treatment_weight, tags={"arm": CONTROL})
            batch, self._observations = self._observations, []
            if batch:
                self._control.observe.remote(batch)

    async def rank(self, request: RankRequest, principal: Principal) -> RankResponse:
        return await self._call(CONTROL, "ranked", request.q, request.depth, request.strategy)

    # -- learning --------------------------------------------------------------------------
    async def feedback(self, request: FeedbackRequest, principal: Principal) -> FeedbackResponse:
        outcome = await self._feedback.record(
            request.search_id, request.graded(), request.model_dump(exclude_none=True),
            graded=request.judgements is not None,
        )
        if outcome.experiences:
            self._control.observe_reward.remote(outcome.arm, outcome.reward)
            try:  # the row is stored; a restarting actor replays it from the database
                await asyncio.wait_for(self._learning.add.remote(outcome.experiences), _ACTOR_TIMEOUT_S)
            except Exception as error:
                log.warning("experience not handed to the learning actor", extra={"error": repr(error)})
        rewards = outcome.action_rewards
        return FeedbackResponse(
            search_id=outcome.search_id, reward=outcome.reward, duplicate=outcome.duplicate,
            strategy_rewards=None if rewards is None else dict(zip(STRATEGIES, rewards, strict=True)),
        )

    async def _ask(self, *calls):
        """Await actor calls with a timeout; an absent actor is a 503 that says it comes back."""
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), _ACTOR_TIMEOUT_S)
        except (RayActorError, TimeoutError) as error:
            raise ServiceUnavailable(
                f"a control actor is unavailable ({type(error).__name__}); it restarts by itself, retry shortly"
            ) from error

    async def learning(self) -> dict[str, Any]:
        state, q_table, learners = await self._ask(
            self._learning.stats.remote(), self._learning.q_table.remote(), self._learners.stats.remote())
        return {"state": state, "learners": learners, "q_table": q_table}

    # -- operations (admin scope) ----------------------------------------------------------
    async def flags(self) -> dict[str, Any]:
        (live,) = await self._ask(self._control.live_if_newer.remote(-1))
        return {"arms": live.flags, "behaviour": {f: b or "no behaviour yet" for f, b in FLAG_BEHAVIOUR.items()},
                "version": live.version}

    async def set_flags(self, arm: str, flags: dict[str, bool]) -> dict[str, Any]:
        (live,) = await self._ask(self._control.set_flags.remote(arm, flags))
        return {"arms": live.flags, "version": live.version}

    async def rollout(self, action: str, **arguments: Any) -> dict[str, Any]:
        """`status`, or an operator action (`advance`, `rollback`, `set_weight`, `set_fault`)."""
        if action != "status":
            await self._ask(getattr(self._control, action).remote(**arguments))
        (status,) = await self._ask(self._control.status.remote())
        return status

    # -- health ----------------------------------------------------------------------------
    async def _arm_ready(self, handle: DeploymentHandle) -> bool:
        try:
            return await asyncio.wait_for(handle.ping.remote(), _ARM_PING_TIMEOUT_S)
        except Exception:  # any failure means "not ready"; /health reports, never raises
            return False

    async def health(self) -> Health:
        database_error = None
        try:
            async with asyncio.timeout(_ARM_PING_TIMEOUT_S):
                await self._pool.fetchval("SELECT 1")
        except Exception as error:  # /health reports every failure, never raises
            database_error = f"{type(error).__name__}: {error}"
        ready = await asyncio.gather(*(self._arm_ready(self._arms[arm]) for arm in ARMS))
        return Health(
            environment=self._settings.environment,
            database_ready=database_error is None,
            database_error=database_error,
            cluster=dict(zip(ARMS, ready, strict=True)),
        )
