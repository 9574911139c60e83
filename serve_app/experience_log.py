"""Served searches on their way to the `experiences` table, off the request path.

`record` never waits: it puts the experience on a bounded queue, or counts it as dropped when
the queue is full. A background task writes batches with COPY. While the database is away it
holds the batch and retries, so an outage loses no search answered before it (the queue bounds
what waits). A batch the database refuses is written again row by row, skipping rows already
there (a COPY that committed while its connection died is retried into duplicates), so only the
rows it refuses themselves are logged and counted as dropped. Learning may lose data, but a
search never fails for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import asyncpg

from cluster.platform.database import DatabaseUnavailable, unavailable_on_connection_errors

log = logging.getLogger(__name__)
_MAX_RETRY_S = 1.0  # a returning database gets the held batch within a second
_WRITE_TIMEOUT_S = 10.0  # a COPY whose connection died unseen is retried, not awaited for ever

@dataclasses.dataclass(frozen=True)
class ServedSearch:
    """A row of the `experiences` table as served; its fields are the columns written."""

    search_id: str
    arm: str
    session_id: str | None
    state_key: str  # readable label (`learners.state_encoder`), for reports
    query: str  # graded feedback ranks it again under every action
    depth: int  # hits asked for
    context: list[float]  # the policy's input (`learners.context`)
    action: int  # index in the policy's actions
    strategy: str  # the action's name
    propensity: float
    policy_version: int
    served_doc_ids: list[str]
    action_probabilities: list[float]  # pi(.|x) of the behaviour policy, in action order
    answer_mode: str  # extractive, generated or debate, as resolved for this search
    cost_cpu_ms: float  # of the stages the action ran after the lexical one
    cost_wall_ms: float
    # The answer mode, when the answer policy (or its rule, for `auto`) chose it: index in the
    # answer modes, pi(.|x), and what composing the answer cost (None: not learned from).
    answer_action: int | None
    answer_propensity: float | None
    answer_probabilities: list[float] | None
    answer_cost_cpu_ms: float | None
    answer_wall_ms: float | None

    def record(self) -> tuple[object, ...]:
        """The row in column order."""
        return tuple(getattr(self, name) for name in COLUMNS)


COLUMNS = tuple(field.name for field in dataclasses.fields(ServedSearch))
_INSERT_IF_NEW = (f"INSERT INTO experiences ({', '.join(COLUMNS)}) "
                  f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) ON CONFLICT (search_id) DO NOTHING")


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
        """Write the batch; while the database is away, keep it and try again (new searches wait in
        the bounded queue meanwhile), so an outage loses none that were answered before it."""
        records = [search.record() for search in batch]
        retry_s = self._flush_interval_s
        while True:
            try:
                async with unavailable_on_connection_errors("experience log"):  # a time-out included
                    await asyncio.wait_for(self._pool.copy_records_to_table(
                        "experiences", records=records, columns=COLUMNS), _WRITE_TIMEOUT_S)
                return
            except DatabaseUnavailable as error:
                log.warning("experience batch waiting for the database",
                            extra={"size": len(batch), "error": repr(error.__cause__)})
                await asyncio.sleep(retry_s)
                retry_s = min(2 * retry_s, _MAX_RETRY_S)
            except Exception as error:  # refused rows, or anything else: the writer must outlive it
                log.warning("experience batch refused; writing it row by row",
                            extra={"size": len(batch), "error": repr(error)})
                await self._write_each(records)
                return

    async def _write_each(self, records: list[tuple[object, ...]]) -> None:
        """Insert rows one at a time, keeping any already stored; a row refused, or met by an outage
        now, is dropped and counted (this path is rare: it must not hold the queue for long)."""
        for record in records:
            try:
                async with unavailable_on_connection_errors("experience log"):
                    await asyncio.wait_for(self._pool.execute(_INSERT_IF_NEW, *record), _WRITE_TIMEOUT_S)
            except Exception as error:
                self.dropped += 1
                log.warning("experience dropped", extra={"search_id": record[0], "error": repr(error)})
