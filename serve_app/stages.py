"""The stages a search runs after its lexical stage, each at most once per query and timed.

An action's cost is the sum of the stages it needs, whether they ran for it or were already
there, so every action of a query is costed the same way, which is how graded feedback and
evaluation rank one query under every action.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from cluster.core.actions import RetrievalAction
from learners.state_encoder import encode_state
from serve_app.fusion import Ranking, complete_score_fusion
from serve_app.retrieval import DocumentIndex

EmbedQuery = Callable[[str], Awaitable[tuple[np.ndarray, float]]]  # unit vector, CPU ms it took
PRF_DOCS = 3  # dense hits whose mean vector pseudo-relevance feedback adds to the query


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a stage (or the stages an action ran) cost: CPU and wall-clock milliseconds.

    CPU is the embedder's own CPU for the query embedding, the calling thread's CPU for fusion,
    and the statement's wall time for SQL (a cached query keeps its PostgreSQL backend busy on
    the CPU for as long as it runs).
    """

    cpu_ms: float = 0.0
    wall_ms: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.cpu_ms + other.cpu_ms, self.wall_ms + other.wall_ms)


class QueryStages:
    """The stages of one query after its lexical stage, each run at most once, with its cost."""

    def __init__(self, index: DocumentIndex, embed_query: EmbedQuery, query: str, lexical: Ranking, k: int):
        self._index = index
        self._embed_query = embed_query
        self.query = query
        self.lexical = lexical
        self._k = k
        self._stages: dict[str, tuple[Any, Cost]] = {}
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _stage(self, name: str, run: Callable[[], Awaitable[Any]], *, reports_cpu: bool = False) -> Any:
        """Run `run` once and time it. Its CPU is its wall time (SQL: a cached statement keeps its
        backend on the CPU that long), unless `reports_cpu`: then it returns (value, CPU ms)."""
        async with self._locks[name]:
            if name not in self._stages:
                started = time.perf_counter()
                value = await run()
                wall_ms = (time.perf_counter() - started) * 1000
                value, cpu_ms = value if reports_cpu else (value, wall_ms)
                self._stages[name] = value, Cost(cpu_ms, wall_ms)
        return self._stages[name][0]

    async def vector(self) -> np.ndarray:
        return await self._stage("embed", lambda: self._embed_query(self.query), reports_cpu=True)

    async def dense(self) -> Ranking:
        vector = await self.vector()
        return await self._stage("dense", lambda: self._index.dense(vector, self._k))

    async def prf_vector(self) -> np.ndarray:
        """The query vector plus the mean of its top PRF_DOCS dense hits' vectors, unit length."""
        dense, vector = await self.dense(), await self.vector()

        async def run() -> np.ndarray:
            top = await self._index.vectors([doc_id for doc_id, _ in dense[:PRF_DOCS]])
            moved = vector + np.mean(list(top.values()), axis=0) if top else vector
            return moved / max(float(np.linalg.norm(moved)), 1e-12)

        return await self._stage("prf_vectors", run)

    async def prf_dense(self) -> Ranking:
        vector = await self.prf_vector()
        return await self._stage("prf_dense", lambda: self._index.dense(vector, self._k))

    async def complete_scores(self, prf: bool) -> tuple[dict[str, float], dict[str, float]]:
        """(BM25, cosine) of every candidate of the lexical and the (PRF) dense list."""
        dense = await (self.prf_dense() if prf else self.dense())
        vector = await (self.prf_vector() if prf else self.vector())

        async def run() -> tuple[dict[str, float], dict[str, float]]:
            lexical, cosine = dict(self.lexical), dict(dense)
            missing_lexical = [d for d in cosine if d not in lexical]
            missing_dense = [d for d in lexical if d not in cosine]
            more_lexical, more_cosine = await asyncio.gather(
                self._index.lexical_scores(self.query, missing_lexical),
                self._index.dense_scores(vector, missing_dense))
            return {**more_lexical, **lexical}, {**more_cosine, **cosine}

        return await self._stage("complete_prf" if prf else "complete", run)

    def state_key(self) -> str:
        """The readable state key of `learners.state_encoder` (agreement with dense, when it ran)."""
        dense = self._stages["dense"][0] if "dense" in self._stages else []
        return encode_state(self.query, [d for d, _ in self.lexical], [d for d, _ in dense])

    def cost(self, action: RetrievalAction) -> Cost:
        """The stages `action` needs, summed (they must have run)."""
        if not action.dense:
            return Cost()
        names = ("embed", "dense", "prf_vectors", "prf_dense", "complete_prf") if action.prf else (
            "embed", "dense", "complete")
        return sum((self._stages[name][1] for name in names), Cost())

    async def run(self, action: RetrievalAction, depth: int) -> tuple[Ranking, Cost]:
        """The ranking `action` serves and what it cost, fusion included."""
        if action.fusion_weight is None:
            if len(self.lexical) >= depth:
                return self.lexical[:depth], Cost()
            # Fewer BM25 matches than asked for: fill from the dense ranking (score 0, after every
            # lexical match) so `depth` is honoured, and count what that took.
            dense = await self.dense()
            seen = {doc_id for doc_id, _ in self.lexical}
            backfill = [(doc_id, 0.0) for doc_id, _ in dense if doc_id not in seen]
            return (self.lexical + backfill)[:depth], self._stages["embed"][1] + self._stages["dense"][1]
        lexical, cosine = await self.complete_scores(action.prf)
        cpu_started, started = time.thread_time(), time.perf_counter()
        fused = complete_score_fusion(lexical, cosine, action.fusion_weight)[:depth]
        fusion = Cost((time.thread_time() - cpu_started) * 1000, (time.perf_counter() - started) * 1000)
        return fused, self.cost(action) + fusion

    async def run_each(self, actions: Sequence[RetrievalAction], depth: int) -> list[tuple[Ranking, Cost]]:
        """`run` for every action in turn, sharing the stages they have in common."""
        return [await self.run(action, depth) for action in actions]
