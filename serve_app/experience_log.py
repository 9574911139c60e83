"""Served searches on their way to the `experiences` table, off the request path.

`record` never waits: it puts the experience on a bounded queue, or counts it as dropped when
the queue is full. A background task writes batches with COPY; a failed write is logged and
its batch counted as dropped, so learning may lose data but a search never fails for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ServedSearch:
    """A row of the `experiences` table as served; its fields are the columns written."""

    search_id: str
    arm: str
    session_id: str | None
    state_key: str
    action: int
    strategy: str
    propensity: float
    policy_version: int
    served_doc_ids: list[str]
    # The list each action would have served, in action order; computed when written, since
    # fusing every strategy costs more than the search's own response can wait for.
    strategy_doc_ids: Callable[[], list[list[str]]]
    action_probabilities: list[float]  # pi(.|s) of the behaviour policy, in action order
    answer_mode: str  # extractive, generated or debate, as resolved for this search

    def record(self) -> tuple[object, ...]:
        """The row in column order, with every strategy's list fused now."""
        return tuple(json.dumps(self.strategy_doc_ids()) if name == "strategy_doc_ids" else getattr(self, name)
                     for name in COLUMNS)


COLUMNS = tuple(field.name for field in dataclasses.fields(ServedSearch))


class ExperienceLog:
    def __init__(self, pool: asyncpg.Pool, capacity: int, flush_interval_s: float, batch_size: int = 256):
        self._pool = pool
        self._queue: asyncio.Queue[ServedSearch] = asyncio.Queue(maxsize=capacity)
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self.dropped = 0

    def record(self, search: ServedSearch) -> None:
        try:
            self._queue.put_nowait(search)
        except asyncio.QueueFull:
            self.dropped += 1

    async def run(self) -> None:
        """Write batches forever: whatever is queued, at least every `flush_interval_s`."""
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self._flush_interval_s)  # let a batch gather
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def _write(self, batch: list[ServedSearch]) -> None:
        records = [search.record() for search in batch]
        try:
            await self._pool.copy_records_to_table("experiences", records=records, columns=COLUMNS)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            self.dropped += len(batch)
            log.warning("experience batch dropped", extra={"size": len(batch), "error": repr(error)})
