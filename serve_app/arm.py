"""An arm: the search pipeline as a Serve deployment with its own name, flags and replicas.

Control and treatment are deployments of this same class. Its flags are read from the live
config (`cluster.control_plane`) on every request, so a flip reaches the replica within the
refresh interval without a restart; until the control plane answers, the settings' defaults hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

import numpy as np
import psutil
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.control_plane import LiveConfig, control_handle
from cluster.database import create_pool
from cluster.metrics import ArmMetrics
from cluster.settings import Settings
from learners.learning_core import PolicySnapshot
from learners.learning_state import learning_state_handle
from serve_app.experience_log import ExperienceLog
from serve_app.pipeline import SearchPipeline
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import RankResponse, SearchResponse, Strategy
from serve_app.versioned_cache import VersionedCache

_REPORT_INTERVAL_S = 5.0


class InjectedFault(RuntimeError):
    """Raised on purpose (ENVIRONMENT=test only) so tests can watch the guard roll back."""


async def _policy_if_newer(version: int) -> PolicySnapshot | None:
    return await learning_state_handle().policy_if_newer.remote(version)


async def _live_if_newer(version: int) -> LiveConfig | None:
    return await control_handle().live_if_newer.remote(version)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class PipelineArm:
    async def __init__(
        self, settings: Settings, embedder: DeploymentHandle, arm: str, default_flags: Mapping[str, bool]
    ):
        assert settings.database.url, "the database URL is resolved before deployment"
        pool = await create_pool(settings.database.url, settings.database)
        retrieval, learning = settings.retrieval, settings.learning
        index = DocumentIndex(
            pool, bm25_k1=retrieval.bm25_k1, bm25_b=retrieval.bm25_b, ef_search=retrieval.ef_search
        )

        async def embed_query(query: str) -> np.ndarray:
            return await embedder.embed.remote(query)

        self._arm = arm
        self._default_flags = dict(default_flags)
        self._metrics = ArmMetrics()
        self._experiences = ExperienceLog(pool, learning.experience_queue, learning.experience_flush_s)
        self._policy: VersionedCache[PolicySnapshot] = VersionedCache(_policy_if_newer, learning.policy_refresh_s)
        self._live: VersionedCache[LiveConfig] = VersionedCache(_live_if_newer, settings.rollout.live_refresh_s)
        self._pipeline = SearchPipeline(
            index, embed_query, retrieval, arm,
            current_flags=self.flags,
            current_policy=lambda: self._policy.current,
            record_experience=self._experiences.record,
        )
        # Held so they are not garbage-collected; they live as long as the replica.
        self._background = [asyncio.create_task(task) for task in (
            self._experiences.run(), self._policy.run(), self._live.run(), self._report())]

    def flags(self) -> Mapping[str, bool]:
        live = self._live.current
        return live.flags[self._arm] if live else self._default_flags

    def _check_fault(self) -> None:
        live = self._live.current
        if live and live.faults.get(self._arm):
            raise InjectedFault(f"fault injected into arm '{self._arm}' (ENVIRONMENT=test)")

    async def search(
        self, query: str, final_topk: int, strategy: Strategy | None, session_id: str | None
    ) -> SearchResponse:
        self._check_fault()
        version = self._live.version  # read before the flags, so it never claims a newer config
        response = await self._pipeline.search(query, final_topk, strategy, session_id)
        self._metrics.latency.observe(response.latency_ms / 1000,
                                      tags={"arm": self._arm, "strategy": response.strategy})
        return response.model_copy(update={"config_version": version})

    async def ranked(self, query: str, depth: int, strategy: Strategy | None) -> RankResponse:
        return await self._pipeline.ranked(query, depth, strategy)

    async def ping(self) -> bool:
        await self._pipeline.ping_database()
        return True

    async def _report(self) -> None:
        """Every few seconds: memory to the rollout guard, counters to Prometheus."""
        replica = serve.get_replica_context().replica_id.unique_id
        process = psutil.Process(os.getpid())
        while True:
            self._metrics.policy_version.set(self._policy.version, tags={"arm": self._arm})
            self._metrics.experiences_dropped.set(self._experiences.dropped,
                                                  tags={"arm": self._arm, "replica": replica})
            with contextlib.suppress(ValueError):  # the control plane is not up yet
                control_handle().observe_memory.remote(self._arm, replica, process.memory_info().rss / 2**20)
            await asyncio.sleep(_REPORT_INTERVAL_S)
