"""The search pipeline: embed, gather candidates, fuse by strategy, compose the answer.

Plain Python over a `DocumentIndex` and an async embedding function, so the same code runs as
a Ray Serve arm, in a single uvicorn process, or in a test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np

from cluster.settings import RetrievalSettings
from serve_app.answer import extractive_answer, snippet
from serve_app.fusion import Ranking, reciprocal_rank_fusion, weighted_score_fusion
from serve_app.retrieval import DocumentIndex
from serve_app.schemas import AnswerBody, Hit, RankedId, RankResponse, SearchResponse, Strategy

EmbedQuery = Callable[[str], Awaitable[np.ndarray]]


class SearchPipeline:
    def __init__(
        self, index: DocumentIndex, embed_query: EmbedQuery, settings: RetrievalSettings, arm: str
    ):
        self._index = index
        self._embed_query = embed_query
        self._settings = settings
        self.arm = arm

    def _strategy(self, requested: Strategy | None) -> Strategy:
        return requested or self._settings.default_strategy  # type: ignore[return-value]

    async def _dense(self, query: str, k: int) -> Ranking:
        return await self._index.dense(await self._embed_query(query), k)

    async def rank(self, query: str, strategy: Strategy, depth: int) -> Ranking:
        """The top `depth` documents for `query` under `strategy`."""
        if strategy == "lexical":
            return await self._index.lexical(query, depth)
        if strategy == "dense":
            return await self._dense(query, depth)
        # Fusion looks deeper than it returns so documents ranked well by one retriever survive.
        k = max(depth, self._settings.candidates)
        lexical, dense = await asyncio.gather(self._index.lexical(query, k), self._dense(query, k))
        if strategy == "hybrid_rrf":
            fused = reciprocal_rank_fusion([lexical, dense], self._settings.rrf_k)
        else:
            fused = weighted_score_fusion(lexical, dense, self._settings.fusion_weight)
        return fused[:depth]

    async def search(self, query: str, final_topk: int, strategy: Strategy | None) -> SearchResponse:
        started = time.perf_counter()
        chosen = self._strategy(strategy)
        ranking = await self.rank(query, chosen, final_topk)
        documents = await self._index.fetch([doc_id for doc_id, _ in ranking])
        ranked_docs = [documents[doc_id] for doc_id, _ in ranking if doc_id in documents]
        answer = extractive_answer(query, ranked_docs)
        hits = [
            Hit(doc_id=doc_id, title=documents[doc_id].title,
                snippet=snippet(query, documents[doc_id].text), score=score, rank=rank)
            for rank, (doc_id, score) in enumerate(ranking, start=1)
            if doc_id in documents
        ]
        return SearchResponse(
            search_id=uuid.uuid4().hex,
            query=query,
            hits=hits,
            answer=AnswerBody(text=answer.text, citations=answer.citations, mode=answer.mode),
            strategy=chosen,
            arm=self.arm,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def ranked(self, query: str, depth: int, strategy: Strategy | None) -> RankResponse:
        started = time.perf_counter()
        chosen = self._strategy(strategy)
        ranking = await self.rank(query, chosen, depth)
        return RankResponse(
            query=query,
            strategy=chosen,
            ranking=[RankedId(doc_id=d, score=s) for d, s in ranking],
            arm=self.arm,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def ping_database(self) -> None:
        await self._index.ping()
