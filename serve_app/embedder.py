"""The embedder deployment: one model shared by every arm, queries batched per forward pass."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from cluster.platform.metrics import embed_batch_size_histogram, report_memory_every
from serve_app.batching import BusyBatcher
from serve_app.embedding import TextEmbedder


@serve.deployment  # replicas and resources: configs/serve.yaml
class Embedder:
    """Batches concurrent queries (`BusyBatcher`): one forward pass serves every query that
    arrived while the previous one ran, and a query that finds the model idle runs at once."""

    def __init__(self, max_batch_size: int):
        # One thread for the one CPU the replica reserves: on one query, a second thread doubled
        # the CPU (40 vs 19 ms, measured) and was no faster (24 vs 19 ms wall).
        self._model = TextEmbedder(threads=1)
        self._batch_size = embed_batch_size_histogram()
        self._batcher: BusyBatcher[str, tuple[np.ndarray, float]] = BusyBatcher(self._encode, max_batch_size)
        report_memory_every("embedder")

    async def check_health(self) -> None:
        """Serve's periodic check: one query through the batching path gives a unit vector
        (about 20 ms of CPU per `DTRAG_HEALTH_CHECK_PERIOD_S`)."""
        vector, _ = await self.embed("health check")
        if not (np.all(np.isfinite(vector)) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3):
            raise RuntimeError("the embedding model returned a vector that is not finite and unit-length")

    async def embed(self, text: str) -> tuple[np.ndarray, float]:
        """The query's unit vector and its share of its batch's CPU milliseconds."""
        return await self._batcher(text)

    async def _encode(self, texts: list[str]) -> list[tuple[np.ndarray, float]]:
        self._batch_size.observe(len(texts))
        # In a thread so the event loop keeps queueing the next batch meanwhile.
        vectors, cpu_ms = await asyncio.to_thread(self._model.encode_with_cpu, texts)
        return [(vector, cpu_ms / len(texts)) for vector in vectors]
