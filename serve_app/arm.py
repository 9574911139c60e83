"""An arm: the search pipeline as a Serve deployment with its own name, flags and replicas."""

from __future__ import annotations

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.database import create_pool
from cluster.settings import Settings
from serve_app.pipeline import SearchPipeline
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import RankResponse, SearchResponse, Strategy


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PipelineArm:
    async def __init__(self, settings: Settings, embedder: DeploymentHandle, arm: str):
        assert settings.database.url, "the database URL is resolved before deployment"
        pool = await create_pool(settings.database.url, settings.database)
        retrieval = settings.retrieval
        index = DocumentIndex(
            pool, bm25_k1=retrieval.bm25_k1, bm25_b=retrieval.bm25_b, ef_search=retrieval.ef_search
        )

        async def embed_query(query: str) -> np.ndarray:
            return await embedder.embed.remote(query)

        self._pipeline = SearchPipeline(index, embed_query, retrieval, arm)

    async def search(self, query: str, final_topk: int, strategy: Strategy | None) -> SearchResponse:
        return await self._pipeline.search(query, final_topk, strategy)

    async def ranked(self, query: str, depth: int, strategy: Strategy | None) -> RankResponse:
        return await self._pipeline.ranked(query, depth, strategy)

    async def ping(self) -> bool:
        await self._pipeline.ping_database()
        return True
