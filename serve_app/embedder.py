"""The embedder deployment: one model shared by every arm, queries batched per forward pass."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from serve_app.embedding import TextEmbedder


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Embedder:
    """Batches concurrent queries with `@serve.batch`: one forward pass serves many requests."""

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float):
        self._model = TextEmbedder()
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, texts: list[str]) -> list[np.ndarray]:
        # In a thread so the event loop keeps gathering the next batch meanwhile.
        vectors = await asyncio.to_thread(self._model.encode, texts)
        return list(vectors)
