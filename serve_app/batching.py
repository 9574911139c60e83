"""Batching that waits for the model, not for a clock.

Serve's `@serve.batch` gathers each batch for a fixed `batch_wait_timeout_s` after its first
request and starts gathering the next one at once, while the previous batch still runs: a lone
query waits out the timeout for nothing, and under load a batch holds only what arrived within
that window. `BusyBatcher` starts a batch as soon as the model is free and puts in it everything
that queued while the model was busy, so an idle replica adds no wait and batches grow with load.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BusyBatcher(Generic[T, R]):
    """`await batcher(item)` -> `run_batch`'s result for that item; one batch runs at a time."""

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._draining: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(), name="batcher")
        return await future

    async def _drain(self) -> None:
        """Run batches until nothing waits. No await between the last check and the reset, so an
        item that arrives meanwhile starts a new drain."""
        try:
            while self._waiting:
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch_size))]
                batch = [(item, future) for item, future in batch if not future.cancelled()]
                if batch:
                    await self._run([item for item, _ in batch], [future for _, future in batch])
        finally:
            self._draining = None

    async def _run(self, items: list[T], futures: list[asyncio.Future[R]]) -> None:
        try:
            results = await self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"a batch of {len(items)} items gave {len(results)} results")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as error:  # every caller of this batch gets the failure; the next batch still runs
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        else:
            for future, result in zip(futures, results):
                if not future.done():
                    future.set_result(result)
