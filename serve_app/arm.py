"""An arm: the search pipeline as a Serve deployment with its own name, flags and replicas.

Control and treatment are deployments of this same class. Its flags come from the live config
that `RolloutControl` owns, read once per request, so a flip reaches the replica within the
refresh interval without a restart; until the control actor answers, the settings' defaults hold.
A fault switched on in the live config (a drill) is obeyed only by arms that themselves run with
`ENVIRONMENT=test`, whatever the control actor says.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from cluster.core.vocabulary import Arm
from cluster.platform.database import create_pool
from cluster.platform.log import configure_logging
from cluster.platform.metrics import AnswerMetrics, ArmMetrics, ProcessMemory
from cluster.platform.settings import Settings
from learners.learning_core import Policies
from serve_app.experience_log import ExperienceLog
from serve_app.live_config import live_config
from serve_app.answers.from_settings import composer_from_settings
from serve_app.pipeline import ArmConfig, SearchEvent, SearchPipeline
from serve_app.replica_health import check_alive
from serve_app.stages import Cost
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import AnswerBody, RankRequest, RankResponse, SearchRequest, SearchResponse
from serve_app.versioned_cache import VersionedCache

_REPORT_INTERVAL_S = 5.0


class InjectedFault(RuntimeError):
    """Raised on purpose (ENVIRONMENT=test only) so tests can watch the guard roll back."""


@serve.deployment  # replicas and resources: configs/serve.yaml
class PipelineArm:
    async def __init__(self, settings: Settings, embedder: DeploymentHandle, arm: Arm,
                       rollout_control: ActorHandle, learning_state: ActorHandle):
        assert settings.database.url, "the database URL is resolved before deployment"
        configure_logging(settings.log_level)
        self._pool = pool = await create_pool(settings.database.url, settings.database)
        retrieval, learning = settings.retrieval, settings.learning
        index = DocumentIndex.configured(pool, retrieval)

        async def embed_query(query: str) -> tuple[np.ndarray, float]:
            return await embedder.embed.remote(query)

        self._arm = arm
        self._faults_allowed = settings.environment == "test"
        self._default = ArmConfig(0, settings.features)
        self._control = rollout_control
        self._metrics = ArmMetrics()
        self._answer_metrics = AnswerMetrics()
        self._experiences = ExperienceLog(pool, learning.experience_queue, learning.experience_flush_s)
        self._policy: VersionedCache[Policies] = VersionedCache(
            "policy", learning_state.policy_if_newer.remote, learning.policy_refresh_s)
        self._live = live_config(rollout_control, settings.rollout.live_refresh_s)
        self._pipeline = SearchPipeline(
            index, embed_query, retrieval, composer_from_settings(settings), arm,
            answer_modes=settings.answers.modes, current_policy=lambda: self._policy.current,
            record_experience=self._experiences.record,
        )
        # Held so they are not garbage-collected; they live as long as the replica.
        self._background = [asyncio.create_task(task, name=name) for name, task in (
            ("experience log", self._experiences.run()), ("policy", self._policy.run()),
            ("live config", self._live.run()), ("report", self._report()))]

    async def check_health(self) -> None:
        """Serve's periodic check: this replica's own pool and loops, never the shared database
        (`serve_app.replica_health`); `ping` is the readiness `/health` reports."""
        check_alive(self._pool, self._background)

    def _config(self) -> ArmConfig:
        """This request's config: read once, so a flip never splits a request."""
        live = self._live.current
        return ArmConfig(live.version, live.flags[self._arm]) if live else self._default

    def _check_fault(self) -> None:
        live = self._live.current
        if self._faults_allowed and live and live.faults.get(self._arm):
            raise InjectedFault(f"fault injected into arm '{self._arm}' (ENVIRONMENT=test)")

    def _record_answer(self, answer: AnswerBody) -> None:
        usage = answer.usage
        self._answer_metrics.record(answer.provider, answer.mode, answer.latency_ms,
                                    usage.input_tokens if usage else 0, usage.output_tokens if usage else 0,
                                    answer.fallback, answer.dropped_citations)

    async def search(self, request: SearchRequest, session_id: str | None) -> SearchResponse:
        self._check_fault()
        response = await self._pipeline.search(request, session_id, self._config())
        self._metrics.latency.observe(response.latency_ms / 1000,
                                      tags={"arm": self._arm, "strategy": response.strategy})
        self._record_answer(response.answer)
        return response

    async def search_events(self, request: SearchRequest, session_id: str | None) -> AsyncIterator[SearchEvent]:
        """The search as Server-Sent Events; the caller's disconnect cancels it, provider calls included."""
        self._check_fault()
        async for event in self._pipeline.search_events(request, session_id, self._config()):
            if event.name == "answer":
                self._record_answer(AnswerBody.model_validate(event.data))
            yield event

    async def ranked(self, request: RankRequest) -> RankResponse:
        return await self._pipeline.ranked(request, self._config())

    async def every_action(self, query: str, depth: int) -> tuple[list[float], list[tuple[list[str], Cost]]]:
        """Every policy action's ids and cost for a query: graded feedback rewards them all."""
        return await self._pipeline.every_action(query, depth)

    async def ping(self) -> bool:
        """Ready to serve: it reaches the database and is not failing on purpose (a drill)."""
        self._check_fault()
        await self._pipeline.ping_database()
        return True

    async def _report(self) -> None:
        """Every few seconds: memory to the rollout guard, counters to Prometheus."""
        replica = serve.get_replica_context().replica_id.unique_id
        memory = ProcessMemory("arm")  # what the guard judges is what ArmMemoryHigh alerts on
        while True:
            self._metrics.policy_version.set(self._policy.version, tags={"arm": self._arm})
            self._metrics.experiences_dropped.set(self._experiences.dropped,
                                                  tags={"arm": self._arm, "replica": replica})
            self._control.observe_memory.remote(self._arm, replica, memory.report())
            await asyncio.sleep(_REPORT_INTERVAL_S)
