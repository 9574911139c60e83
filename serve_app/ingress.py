"""The ingress deployment: the HTTP API, API-key checks, and the hand-off to an arm."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.api_keys import ApiKeyVerifier, Principal
from cluster.database import create_pool
from cluster.errors import ServiceUnavailable
from cluster.settings import Settings
from serve_app.api import Health, create_api
from learners.learner import get_or_create_driver
from learners.learning_state import get_or_create_learning_state
from serve_app.feedback import FeedbackStore
from serve_app.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    RankRequest,
    RankResponse,
    SearchRequest,
    SearchResponse,
)

CONTROL_ARM = "control"
_ARM_PING_TIMEOUT_S = 2.0
_ACTOR_TIMEOUT_S = 2.0

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class Ingress:
    async def __init__(self, settings: Settings, arms: dict[str, DeploymentHandle]):
        assert settings.database.url, "the database URL is resolved before deployment"
        self._settings = settings
        self._pool = await create_pool(settings.database.url, settings.database)
        self._verifier = ApiKeyVerifier(self._pool, settings.http.api_key_cache_s)
        self._feedback = FeedbackStore(self._pool)
        self._arms = arms
        learning = settings.learning
        self._learning = get_or_create_learning_state(settings.database.url, learning)
        self._learners = get_or_create_driver(self._learning, learning.learners, learning.batch_size)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self._verifier)

    def _arm_for(self, principal: Principal) -> str:
        return CONTROL_ARM

    async def _call(self, arm: str, method: str, *args: object):
        """Call an arm; a dead or overloaded arm is a 503, its own errors pass through."""
        try:
            return await getattr(self._arms[arm], method).remote(*args)
        except (RayActorError, BackPressureError, DeploymentUnavailableError) as error:
            raise ServiceUnavailable(f"arm '{arm}' is unavailable: {error}") from error

    async def search(
        self, request: SearchRequest, principal: Principal, session_id: str | None
    ) -> SearchResponse:
        arm = self._arm_for(principal)
        return await self._call(arm, "search", request.q, request.final_topk, request.strategy, session_id)

    async def feedback(self, request: FeedbackRequest, principal: Principal) -> FeedbackResponse:
        outcome = await self._feedback.record(
            request.search_id, request.graded(), request.model_dump(exclude_none=True)
        )
        if outcome.experience is not None:
            try:  # the row is stored; a restarting actor replays it from the database
                await asyncio.wait_for(self._learning.add.remote([outcome.experience]), _ACTOR_TIMEOUT_S)
            except Exception as error:
                log.warning("experience not handed to the learning actor", extra={"error": repr(error)})
        return FeedbackResponse(search_id=outcome.search_id, reward=outcome.reward,
                                duplicate=outcome.duplicate)

    async def learning(self) -> dict[str, Any]:
        try:
            state, q_table, learners = await asyncio.wait_for(asyncio.gather(
                self._learning.stats.remote(), self._learning.q_table.remote(),
                self._learners.stats.remote()), _ACTOR_TIMEOUT_S)
        except Exception as error:
            raise ServiceUnavailable(
                f"the learning actor is unavailable ({type(error).__name__}); it restarts by itself, retry shortly"
            ) from error
        return {"state": state, "learners": learners, "q_table": q_table}

    async def rank(self, request: RankRequest, principal: Principal) -> RankResponse:
        arm = self._arm_for(principal)
        return await self._call(arm, "ranked", request.q, request.depth, request.strategy)

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
        names = list(self._arms)
        ready = await asyncio.gather(*(self._arm_ready(self._arms[n]) for n in names))
        return Health(
            environment=self._settings.environment,
            database_ready=database_error is None,
            database_error=database_error,
            cluster=dict(zip(names, ready, strict=True)),
        )
