"""The search pipeline: lexical first, then the action it calls for, fusion, the answer.

The lexical stage always runs; its statistics are the context (`learners.context`) on which
the policy (or the configured default) picks an action: skip the dense side, or run it with a
fusion weight and optionally pseudo-relevance feedback. Every stage an action runs is timed, and
that cost is logged with the experience, since a learner can only win by trading it for quality.

Plain Python over a `DocumentIndex` and an async embedding function, so the same code runs as
a Ray Serve arm, in a single uvicorn process, or in a test. Each request brings its `ArmConfig`
(the live config version and the arm's flags, read once), so a flag flip never splits a request.
Learning reaches it through two callables: the current policy (read, never awaited) and a
non-blocking experience sink.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from cluster.core.actions import RetrievalAction
from cluster.core.vocabulary import FeatureFlags, Strategy
from cluster.platform.settings import RetrievalSettings
from learners.context import lexical_context
from learners.learning_core import Policies
from serve_app.answers.composer import AnswerComposer, ComposedAnswer, RequestedMode
from serve_app.answers.extractive import snippet
from serve_app.cpu import CpuMeter
from serve_app.decisions import Decision, decide, decide_answer
from serve_app.experience_log import ServedSearch
from serve_app.fusion import Ranking, reciprocal_rank_fusion, weighted_score_fusion
from serve_app.retrieval import DocumentIndex, StoredDocument
from serve_app.search_ids import new_search_id
from serve_app.stages import Cost, EmbedQuery, QueryStages
from serve_app.schemas import (
    ActionRanking,
    AnswerBody,
    Draft,
    Hit,
    RankedId,
    RankRequest,
    RankResponse,
    SearchHits,
    SearchRequest,
    SearchResponse,
    Usage,
)

CurrentPolicy = Callable[[], Policies | None]
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
class _Retrieved:
    """A search's hits before its answer, with what the experience log needs about them."""

    hits: SearchHits
    documents: list[StoredDocument]
    depth: int  # hits asked for
    decision: Decision
    context: np.ndarray
    cost: Cost
    state_key: str


class SearchPipeline:
    def __init__(
        self,
        index: DocumentIndex,
        embed_query: EmbedQuery,
        settings: RetrievalSettings,
        composer: AnswerComposer,
        arm: str,
        *,
        answer_modes: Sequence[str] = ("extractive",),
        current_policy: CurrentPolicy = lambda: None,
        record_experience: RecordExperience | None = None,
        seed: int | None = None,
    ):
        self._index = index
        self._embed_query = embed_query
        self._settings = settings
        self._composer = composer
        self.arm = arm
        self.actions = settings.actions
        self._answer_modes = tuple(answer_modes)
        self._current_policy = current_policy
        self._record_experience = record_experience
        self._rng = np.random.default_rng(seed)

    async def _lexical(self, query: str, depth: int) -> tuple[QueryStages, np.ndarray]:
        """The lexical stage, and the context it gives the policy."""
        k = max(depth, self._settings.candidates)
        lexical, idf = await self._index.lexical_with_idf(query, k)
        context = lexical_context(query, [score for _, score in lexical], idf, k)
        return QueryStages(self._index, self._embed_query, query, lexical, k), context

    async def _strategy(self, stages: QueryStages, strategy: Strategy, depth: int) -> Ranking:
        """One of the original strategies, as it always ranked (partial-list fusion)."""
        if strategy is Strategy.LEXICAL:
            ranking, _ = await stages.run(RetrievalAction(None), depth)
            return ranking
        dense = await stages.dense()
        if strategy is Strategy.DENSE:
            return dense[:depth]
        if strategy is Strategy.HYBRID_RRF:
            return reciprocal_rank_fusion([stages.lexical, dense], self._settings.rrf_k)[:depth]
        return weighted_score_fusion(stages.lexical, dense, self._settings.fusion_weight)[:depth]

    async def _serve(self, query: str, depth: int, requested: Strategy | None,
                     config: ArmConfig) -> tuple[Decision, Ranking, Cost, QueryStages, np.ndarray]:
        stages, context = await self._lexical(query, depth)
        policies = self._current_policy()
        decision = decide(context, requested, self._settings.default_strategy, self._settings.fusion_weight,
                          self.actions, policies.retrieval if policies else None, config.flags.soft_q_bandit,
                          self._rng)
        if decision.action is None:
            return decision, await self._strategy(stages, Strategy(decision.name), depth), Cost(), stages, context
        ranking, cost = await stages.run(decision.action, depth)
        return decision, ranking, cost, stages, context

    async def every_action(self, query: str, depth: int) -> tuple[list[float], list[tuple[list[str], Cost]]]:
        """The context and, for every action in order, the ids it serves and its cost.

        Graded feedback rewards every action this way, off the request path.
        """
        stages, context = await self._lexical(query, depth)
        outcomes = await stages.run_each(self.actions, depth)
        return context.tolist(), [([doc_id for doc_id, _ in ranking], cost) for ranking, cost in outcomes]

    async def _retrieve(self, request: SearchRequest, config: ArmConfig) -> _Retrieved:
        """The lexical stage, the decision, the fused and fetched hits."""
        query, final_topk = request.q, request.final_topk
        decision, ranking, cost, stages, context = await self._serve(query, final_topk, request.strategy, config)
        documents = await self._index.fetch([doc_id for doc_id, _ in ranking])
        ranking = [(doc_id, score) for doc_id, score in ranking if doc_id in documents]
        hits = SearchHits(
            search_id=new_search_id(),
            query=query,
            hits=[
                Hit(doc_id=doc_id, title=documents[doc_id].title,
                    snippet=snippet(query, documents[doc_id].text), score=score, rank=rank)
                for rank, (doc_id, score) in enumerate(ranking, start=1)
            ],
            strategy=decision.name,
            arm=self.arm,
            config_version=config.version,
            policy_version=decision.policy_version,
        )
        return _Retrieved(hits, [documents[doc_id] for doc_id, _ in ranking], final_topk, decision, context,
                          cost, stages.state_key())

    def _decide_answer(self, context: np.ndarray, requested: RequestedMode | None, config: ArmConfig) -> Decision:
        """The answer mode: as asked; for `auto`, the policy's choice when the bandit is on, else the rule."""
        policies = self._current_policy()
        flags = config.flags
        return decide_answer(context, self._composer.resolve(requested, flags.debate_mode),
                             self._composer.asks_auto(requested), self._answer_modes, flags.debate_mode,
                             policies.answer if policies else None, flags.soft_q_bandit, self._rng)

    def _log(self, retrieved: _Retrieved, answer: Decision, answer_cost: Cost | None, session_id: str | None,
             config: ArmConfig) -> None:
        """Hand the served search to the experience log (never waits); skipped unless it was a policy action."""
        decision = retrieved.decision
        if not (self._record_experience and config.flags.experience_replay and decision.index is not None):
            return
        learnable_answer = answer.index is not None and answer_cost is not None
        self._record_experience(ServedSearch(
            search_id=retrieved.hits.search_id, arm=self.arm, session_id=session_id, state_key=retrieved.state_key,
            query=retrieved.hits.query, depth=retrieved.depth,
            context=retrieved.context.tolist(), action=decision.index, strategy=decision.name,
            propensity=decision.propensity, policy_version=decision.policy_version,
            served_doc_ids=[hit.doc_id for hit in retrieved.hits.hits],
            action_probabilities=list(decision.probabilities), answer_mode=answer.name,
            cost_cpu_ms=retrieved.cost.cpu_ms, cost_wall_ms=retrieved.cost.wall_ms,
            answer_action=answer.index if learnable_answer else None,
            answer_propensity=answer.propensity if learnable_answer else None,
            answer_probabilities=list(answer.probabilities) if learnable_answer else None,
            answer_cost_cpu_ms=answer_cost.cpu_ms if answer_cost else None,
            answer_wall_ms=answer_cost.wall_ms if answer_cost else None,
        ))

    async def search(self, request: SearchRequest, session_id: str | None, config: ArmConfig) -> SearchResponse:
        started = time.perf_counter()
        deadline = self._composer.deadline()
        retrieved = await self._retrieve(request, config)
        answer_decision = self._decide_answer(retrieved.context, request.answer_mode, config)
        meter = CpuMeter()
        answer = await meter.measure(self._composer.compose(
            request.q, retrieved.documents, answer_decision.name, deadline, request.debug))
        self._log(retrieved, answer_decision, Cost(meter.cpu_ms, answer.latency_ms), session_id, config)
        return SearchResponse(**dict(retrieved.hits), answer=answer_body(answer),
                              latency_ms=(time.perf_counter() - started) * 1000)

    async def search_events(self, request: SearchRequest, session_id: str | None,
                            config: ArmConfig) -> AsyncIterator[SearchEvent]:
        """The search as events: `hits`, then `delta`s of answer text, then `answer`.

        Logged once the answer is done; a search the caller left before that is logged without
        the answer's cost, so its answer mode is not learned from.
        """
        started = time.perf_counter()
        deadline = self._composer.deadline()
        retrieved = await self._retrieve(request, config)
        answer_decision = self._decide_answer(retrieved.context, request.answer_mode, config)
        meter, answer_cost = CpuMeter(), None
        try:
            yield SearchEvent("hits", retrieved.hits.model_dump(mode="json"))
            pieces = self._composer.stream(request.q, retrieved.documents, answer_decision.name, deadline,
                                           request.debug)
            while True:
                try:
                    piece = await meter.measure(anext(pieces))
                except StopAsyncIteration:
                    break
                if isinstance(piece, str):
                    if piece:
                        yield SearchEvent("delta", {"text": piece})
                else:
                    answer_cost = Cost(meter.cpu_ms, piece.latency_ms)
                    yield SearchEvent("answer", {**answer_body(piece).model_dump(mode="json"),
                                                 "search_latency_ms": (time.perf_counter() - started) * 1000})
        finally:
            self._log(retrieved, answer_decision, answer_cost, session_id, config)

    async def ranked(self, request: RankRequest, config: ArmConfig) -> RankResponse:
        """Ranked ids only; never logged as an experience (evaluation traffic is not feedback).

        With `every_action`, also every policy action's ranking and cost for this query.
        """
        started = time.perf_counter()
        decision, ranking, cost, stages, context = await self._serve(request.q, request.depth, request.strategy, config)
        actions = None
        if request.every_action:
            outcomes = await stages.run_each(self.actions, request.depth)
            actions = [ActionRanking(name=action.name, doc_ids=[d for d, _ in ranked], cpu_ms=c.cpu_ms, wall_ms=c.wall_ms)
                       for action, (ranked, c) in zip(self.actions, outcomes, strict=True)]
        return RankResponse(
            query=request.q,
            strategy=decision.name,
            state_key=stages.state_key(),
            context=context.tolist(),
            ranking=[RankedId(doc_id=d, score=s) for d, s in ranking],
            cost_cpu_ms=cost.cpu_ms,
            actions=actions,
            arm=self.arm,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def ping_database(self) -> None:
        await self._index.ping()
