"""An arm: the search pipeline as a Serve deployment with its own name, flags and replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.database import create_pool
from cluster.settings import Settings
from learners.learning_core import PolicySnapshot
from learners.learning_state import learning_state_handle
from serve_app.experience_log import ExperienceLog
from serve_app.pipeline import SearchPipeline
from serve_app.policy_cache import PolicyCache
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import RankResponse, SearchResponse, Strategy


async def _policy_if_newer(version: int) -> PolicySnapshot | None:
    return await learning_state_handle().policy_if_newer.remote(version)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PipelineArm:
    async def __init__(
        self, settings: Settings, embedder: DeploymentHandle, arm: str, flags: Mapping[str, bool]
    ):
        assert settings.database.url, "the database URL is resolved before deployment"
        pool = await create_pool(settings.database.url, settings.database)
        retrieval, learning = settings.retrieval, settings.learning
        index = DocumentIndex(
            pool, bm25_k1=retrieval.bm25_k1, bm25_b=retrieval.bm25_b, ef_search=retrieval.ef_search
        )

        async def embed_query(query: str) -> np.ndarray:
            return await embedder.embed.remote(query)

        self._experiences = ExperienceLog(pool, learning.experience_queue, learning.experience_flush_s)
        self._policy = PolicyCache(_policy_if_newer, learning.policy_refresh_s)
        self._pipeline = SearchPipeline(
            index, embed_query, retrieval, arm, flags=flags,
            current_policy=lambda: self._policy.current,
            record_experience=self._experiences.record,
        )
        # Held so they are not garbage-collected; they live as long as the replica.
        self._background = [asyncio.create_task(self._experiences.run()),
                            asyncio.create_task(self._policy.run())]

    async def search(
        self, query: str, final_topk: int, strategy: Strategy | None, session_id: str | None
    ) -> SearchResponse:
        return await self._pipeline.search(query, final_topk, strategy, session_id)

    async def ranked(self, query: str, depth: int, strategy: Strategy | None) -> RankResponse:
        return await self._pipeline.ranked(query, depth, strategy)

    async def ping(self) -> bool:
        await self._pipeline.ping_database()
        return True

    def counters(self) -> dict[str, int]:
        """Experience log counters of this replica (dropped: queue full or write failed)."""
        return {"experiences_written": self._experiences.written,
                "experiences_dropped": self._experiences.dropped,
                "policy_version": self._policy.version}

