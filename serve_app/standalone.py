"""The same API and pipeline in one plain uvicorn process, with no Ray.

A baseline for the load benchmark, and a way to debug the pipeline without a cluster:
`python -m serve_app.standalone` (settings from the environment; `DATABASE_URL` required).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import uvicorn

from cluster.core.rate_limit import RateLimiter
from cluster.platform.api_keys import ApiKeyVerifier, Principal
from cluster.platform.database import DATABASE_DOWN, create_pool
from cluster.platform.edge import current_request_id, describe
from cluster.platform.errors import ServiceUnavailable
from cluster.core.vocabulary import FeatureFlags
from cluster.platform.settings import Settings, SettingsError, load_settings
from serve_app.api import Caller, Health, create_api
from serve_app.embedding import TextEmbedder
from serve_app.answers.from_settings import composer_from_settings
from serve_app.pipeline import ArmConfig, SearchEvent, SearchPipeline
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    RankRequest,
    RankResponse,
    SearchRequest,
    SearchResponse,
)

ARM = "standalone"
log = logging.getLogger(__name__)


class LocalBackend:
    """A `SearchBackend` that runs the pipeline in-process."""

    def __init__(self, pipeline: SearchPipeline, environment: str, flags: FeatureFlags):
        self._pipeline = pipeline
        self._environment = environment
        self._config = ArmConfig(0, flags)  # no control plane: the settings' flags, version 0

    async def search(self, request: SearchRequest, principal: Principal, caller: Caller) -> SearchResponse:
        return await self._pipeline.search(request, caller.session_id, self._config)

    def search_events(self, request: SearchRequest, principal: Principal, caller: Caller) -> AsyncIterator[SearchEvent]:
        return self._pipeline.search_events(request, caller.session_id, self._config)

    async def feedback(self, request: FeedbackRequest, principal: Principal) -> FeedbackResponse:
        raise ServiceUnavailable("feedback needs the cluster's learning actor; use `dtrag up`")

    async def learning(self) -> dict[str, Any]:
        raise ServiceUnavailable("the standalone server has no learning actor; use `dtrag up`")

    async def reset_learning(self) -> dict[str, Any]:
        raise ServiceUnavailable("the standalone server has no learning actor; use `dtrag up`")

    async def rank(self, request: RankRequest, principal: Principal) -> RankResponse:
        return await self._pipeline.ranked(request, self._config)

    async def health(self) -> Health:
        error = None
        try:
            await self._pipeline.ping_database()
        except Exception as failure:  # /health reports every failure, never raises
            log.warning("health: database check failed",
                        extra={"request_id": current_request_id(), "detail": describe(failure)})
            error = DATABASE_DOWN
        return Health(self._environment, error is None, error, {ARM: error is None})


async def serve_standalone(settings: Settings) -> None:
    """Serve the API on the configured host and port until interrupted."""
    if not settings.database.url:
        raise SettingsError("DATABASE_URL is not set: the standalone server needs a database")
    model = TextEmbedder()

    async def embed_query(query: str) -> tuple[np.ndarray, float]:
        vectors, cpu_ms = await asyncio.to_thread(model.encode_with_cpu, [query])
        return vectors[0], cpu_ms

    pool = await create_pool(settings.database.url, settings.database)
    retrieval = settings.retrieval
    index = DocumentIndex.configured(pool, retrieval)
    app = create_api(
        LocalBackend(SearchPipeline(index, embed_query, retrieval, composer_from_settings(settings), ARM,
                                    answer_modes=settings.answers.modes),
                     settings.environment, settings.features),
        ApiKeyVerifier(pool, settings.http.api_key_cache_s),
        max_body_bytes=settings.http.max_body_bytes,
        limiter=RateLimiter(settings.http.rate_limit_per_s, settings.http.rate_limit_burst),
    )
    config = uvicorn.Config(app, host=settings.http.host, port=settings.http.port,
                            log_level="warning", access_log=False)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(serve_standalone(load_settings()))
