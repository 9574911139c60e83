"""The search pipeline: embed, gather candidates, choose a strategy, fuse, compose the answer.

Plain Python over a `DocumentIndex` and an async embedding function, so the same code runs as
a Ray Serve arm, in a single uvicorn process, or in a test. Each request brings its `ArmConfig`
(the live config version and the arm's flags, read once), so a flag flip never splits a request.
Learning reaches it through two callables: the current policy (read, never awaited) and a
non-blocking experience sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from cluster.core.vocabulary import STRATEGIES, FeatureFlags, Strategy
from cluster.platform.settings import RetrievalSettings
from learners.learning_core import PolicySnapshot
from learners.soft_q import policy_from_q
from learners.state_encoder import encode_state, state_id
from serve_app.answers.composer import AnswerComposer, AnswerMode, ComposedAnswer
from serve_app.answers.extractive import snippet
from serve_app.experience_log import ServedSearch
from serve_app.fusion import Ranking, reciprocal_rank_fusion, weighted_score_fusion
from serve_app.retrieval import DocumentIndex, StoredDocument
from serve_app.schemas import (
    AnswerBody,
    Draft,
    Hit,
    RankedId,
    RankResponse,
    SearchHits,
    SearchRequest,
    SearchResponse,
    Usage,
)

EmbedQuery = Callable[[str], Awaitable[np.ndarray]]
CurrentPolicy = Callable[[], PolicySnapshot | None]
RecordExperience = Callable[[ServedSearch], None]


@dataclasses.dataclass(frozen=True)
class SearchEvent:
    """One Server-Sent Event of a streamed search: `hits`, `delta` or `answer`, with its JSON data."""

    name: str
    data: dict[str, Any]


def answer_body(answer: ComposedAnswer) -> AnswerBody:
    return AnswerBody(
        text=answer.text, citations=answer.citations, mode=answer.mode, provider=answer.provider,
        model=answer.model, latency_ms=answer.latency_ms, fallback=answer.fallback,  # type: ignore[arg-type]
        usage=Usage(**dataclasses.asdict(answer.usage)) if answer.usage else None,
        dropped_citations=answer.dropped_citations,
        drafts=[Draft(**dataclasses.asdict(d)) for d in answer.drafts] if answer.drafts is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """What one request is served under: the live config's version and the arm's flags."""

    version: int
    flags: FeatureFlags


@dataclasses.dataclass(frozen=True)
class Decision:
    """The strategy used, as the logged action with its propensity under the acting policy."""

    strategy: Strategy
    action: int
    probabilities: tuple[float, ...]  # pi(.|s) of the acting policy, in STRATEGIES order
    policy_version: int

    @property
    def propensity(self) -> float:
        return self.probabilities[self.action]


def choose_strategy(
    state_key: str,
    requested: Strategy | None,
    default: Strategy,
    policy: PolicySnapshot | None,
    use_policy: bool,
    rng: np.random.Generator,
) -> Decision:
    """A requested strategy wins; else a ~ softmax(Q(s,.)/tau) when the bandit is on; else the default.

    With the bandit on and no policy yet, Q = 0 everywhere: the uniform policy.
    """
    version = policy.version if policy else 0
    if requested or not use_policy:
        chosen = requested or default
        certain = tuple(float(a == chosen.action) for a in range(len(STRATEGIES)))
        return Decision(chosen, chosen.action, certain, version)
    q = policy.q.values([state_id(state_key)])[0] if policy else np.zeros(len(STRATEGIES))
    probs = policy_from_q(q, policy.tau if policy else 1.0)
    action = int(rng.choice(len(probs), p=probs))
    return Decision(STRATEGIES[action], action, tuple(probs.tolist()), version)


class SearchPipeline:
    def __init__(
        self,
        index: DocumentIndex,
        embed_query: EmbedQuery,
        settings: RetrievalSettings,
        composer: AnswerComposer,
        arm: str,
        *,
        current_policy: CurrentPolicy = lambda: None,
        record_experience: RecordExperience | None = None,
        seed: int | None = None,
    ):
        self._index = index
        self._embed_query = embed_query
        self._settings = settings
        self._composer = composer
        self.arm = arm
        self._current_policy = current_policy
        self._record_experience = record_experience
        self._rng = np.random.default_rng(seed)

    async def _candidates(self, query: str, depth: int) -> tuple[Ranking, Ranking, str]:
        """Lexical and dense lists deep enough for fusion, and the query's state key."""
        k = max(depth, self._settings.candidates)

        async def dense() -> Ranking:
            return await self._index.dense(await self._embed_query(query), k)

        lexical, dense_list = await asyncio.gather(self._index.lexical(query, k), dense())
        state_key = encode_state(query, [d for d, _ in lexical], [d for d, _ in dense_list])
        return lexical, dense_list, state_key

    def _fuse(self, strategy: Strategy, lexical: Ranking, dense: Ranking, depth: int) -> Ranking:
        if strategy is Strategy.LEXICAL:
            # BM25 omits documents sharing no term with the query; fill a short list from the
            # dense ranking (score 0, after every lexical match) so `depth` is honoured.
            seen = {doc_id for doc_id, _ in lexical}
            backfill = [(doc_id, 0.0) for doc_id, _ in dense if doc_id not in seen]
            return (lexical + backfill)[:depth]
        if strategy is Strategy.DENSE:
            return dense[:depth]
        if strategy is Strategy.HYBRID_RRF:
            return reciprocal_rank_fusion([lexical, dense], self._settings.rrf_k)[:depth]
        return weighted_score_fusion(lexical, dense, self._settings.fusion_weight)[:depth]

    def _every_strategy(self, lexical: Ranking, dense: Ranking, depth: int) -> list[list[str]]:
        """The ids each strategy would serve, in STRATEGIES order."""
        return [[doc_id for doc_id, _ in self._fuse(strategy, lexical, dense, depth)]
                for strategy in STRATEGIES]

    def _decide(self, state_key: str, requested: Strategy | None, use_policy: bool) -> Decision:
        return choose_strategy(
            state_key, requested, self._settings.default_strategy, self._current_policy(), use_policy, self._rng,
        )

    async def _retrieve(self, request: SearchRequest, session_id: str | None, config: ArmConfig,
                        answer_mode: AnswerMode) -> tuple[SearchHits, list[StoredDocument]]:
        """Candidates, the strategy, the fused hits; the served search goes to the experience log."""
        query, final_topk = request.q, request.final_topk
        lexical, dense, state_key = await self._candidates(query, final_topk)
        decision = self._decide(state_key, request.strategy, config.flags.soft_q_bandit)
        ranking = self._fuse(decision.strategy, lexical, dense, final_topk)
        documents = await self._index.fetch([doc_id for doc_id, _ in ranking])
        ranking = [(doc_id, score) for doc_id, score in ranking if doc_id in documents]
        search_id = uuid.uuid4().hex
        if self._record_experience and config.flags.experience_replay:
            self._record_experience(ServedSearch(
                search_id=search_id, arm=self.arm, session_id=session_id, state_key=state_key,
                action=decision.action, strategy=decision.strategy, propensity=decision.propensity,
                policy_version=decision.policy_version, served_doc_ids=[doc_id for doc_id, _ in ranking],
                # What every strategy would have served, so graded feedback can reward each one;
                # fused later by the experience log's writer, off the response path.
                strategy_doc_ids=functools.partial(self._every_strategy, lexical, dense, final_topk),
                action_probabilities=list(decision.probabilities),
                answer_mode=answer_mode,
            ))
        hits = SearchHits(
            search_id=search_id,
            query=query,
            hits=[
                Hit(doc_id=doc_id, title=documents[doc_id].title,
                    snippet=snippet(query, documents[doc_id].text), score=score, rank=rank)
                for rank, (doc_id, score) in enumerate(ranking, start=1)
            ],
            strategy=decision.strategy,
            arm=self.arm,
            config_version=config.version,
        )
        return hits, [documents[doc_id] for doc_id, _ in ranking]

    async def search(self, request: SearchRequest, session_id: str | None, config: ArmConfig) -> SearchResponse:
        started = time.perf_counter()
        deadline = self._composer.deadline()
        mode = self._composer.resolve(request.answer_mode, config.flags.debate_mode)
        found, documents = await self._retrieve(request, session_id, config, mode)
        answer = await self._composer.compose(request.q, documents, mode, deadline, request.debug)
        return SearchResponse(**dict(found), answer=answer_body(answer),
                              latency_ms=(time.perf_counter() - started) * 1000)

    async def search_events(self, request: SearchRequest, session_id: str | None,
                            config: ArmConfig) -> AsyncIterator[SearchEvent]:
        """The search as events: `hits`, then `delta`s of answer text, then `answer`."""
        started = time.perf_counter()
        deadline = self._composer.deadline()
        mode = self._composer.resolve(request.answer_mode, config.flags.debate_mode)
        found, documents = await self._retrieve(request, session_id, config, mode)
        yield SearchEvent("hits", found.model_dump(mode="json"))
        async for piece in self._composer.stream(request.q, documents, mode, deadline, request.debug):
            if isinstance(piece, str):
                if piece:
                    yield SearchEvent("delta", {"text": piece})
            else:
                yield SearchEvent("answer", {**answer_body(piece).model_dump(mode="json"),
                                             "search_latency_ms": (time.perf_counter() - started) * 1000})

    async def ranked(self, query: str, depth: int, strategy: Strategy | None, config: ArmConfig) -> RankResponse:
        """Ranked ids only; never logged as an experience (evaluation traffic is not feedback)."""
        started = time.perf_counter()
        lexical, dense, state_key = await self._candidates(query, depth)
        decision = self._decide(state_key, strategy, config.flags.soft_q_bandit)
        ranking = self._fuse(decision.strategy, lexical, dense, depth)
        return RankResponse(
            query=query,
            strategy=decision.strategy,
            state_key=state_key,
            ranking=[RankedId(doc_id=d, score=s) for d, s in ranking],
            arm=self.arm,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def ping_database(self) -> None:
        await self._index.ping()
