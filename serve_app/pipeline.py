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

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from cluster.core.actions import RetrievalAction
from cluster.core.vocabulary import FeatureFlags, Strategy
from cluster.platform.settings import RetrievalSettings
from learners.context import lexical_context
from learners.learning_core import Policies, PolicySnapshot
from learners.state_encoder import encode_state
from serve_app.answers.composer import AnswerComposer, AnswerMode, ComposedAnswer, RequestedMode
from serve_app.answers.extractive import snippet
from serve_app.cpu import CpuMeter
from serve_app.experience_log import ServedSearch
from serve_app.fusion import Ranking, complete_score_fusion, reciprocal_rank_fusion, weighted_score_fusion
from serve_app.retrieval import DocumentIndex, StoredDocument
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

EmbedQuery = Callable[[str], Awaitable[tuple[np.ndarray, float]]]  # unit vector, CPU ms it took
PRF_DOCS = 3  # dense hits whose mean vector pseudo-relevance feedback adds to the query
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


@dataclasses.dataclass(frozen=True)
class Decision:
    """The action taken, and what the learning log needs about it."""

    action: RetrievalAction | None  # None: one of the original strategies, explicitly requested
    strategy: str  # the action's or strategy's name, as served
    index: int | None  # position in the policy's actions; None when it is not one of them
    probabilities: tuple[float, ...]  # pi(.|x) of the acting policy, in action order
    policy_version: int

    @property
    def propensity(self) -> float:
        return self.probabilities[self.index] if self.index is not None else 1.0


def decide(
    context: np.ndarray,
    requested: Strategy | None,
    default: Strategy,
    fusion_weight: float,
    actions: Sequence[RetrievalAction],
    policy: PolicySnapshot | None,
    use_policy: bool,
    rng: np.random.Generator,
) -> Decision:
    """A requested strategy wins; else a ~ pi(.|x) when the bandit is on; else the default.

    With the bandit on and no policy yet, the default strategy is served as the policy's action
    (a new model serves its default action until it has learned otherwise).
    """
    version = policy.version if policy else 0
    if use_policy and requested is None and policy is not None:
        probabilities = policy.model.probabilities(context)[0]
        index = int(rng.choice(len(probabilities), p=probabilities))
        return Decision(actions[index], actions[index].name, index, tuple(probabilities.tolist()), version)
    chosen = requested or default
    if chosen is not Strategy.HYBRID_COMPLETE:
        return Decision(None, chosen, None, (), version)
    action = RetrievalAction(fusion_weight)
    index = actions.index(action) if action in actions else None
    certain = tuple(float(i == index) for i in range(len(actions))) if index is not None else ()
    return Decision(action, action.name, index, certain, version)


def decide_answer(
    context: np.ndarray,
    rule: AnswerMode,
    auto: bool,
    modes: Sequence[str],
    debate_allowed: bool,
    policy: PolicySnapshot | None,
    use_policy: bool,
    rng: np.random.Generator,
) -> Decision:
    """A named mode is served as asked (not learned from). `auto` is the answer policy's choice among
    `modes` (debate only where the arm's debate_mode flag is on) when the bandit is on, else `rule`,
    the composer's own choice for `auto`, logged with propensity 1."""
    version = policy.version if policy else 0
    if not auto:
        return Decision(None, rule, None, (), version)
    if use_policy and policy is not None and len(modes) > 1:
        allowed = np.array([mode != "debate" or debate_allowed for mode in modes])
        probabilities = policy.model.probabilities(context, allowed)[0]
        index = int(rng.choice(len(probabilities), p=probabilities))
        return Decision(None, modes[index], index, tuple(probabilities.tolist()), version)
    index = modes.index(rule)
    return Decision(None, rule, index, tuple(float(i == index) for i in range(len(modes))), version)


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


class _QueryWork:
    """The stages of one query after its lexical stage, each run at most once, with its cost.

    An action's cost is the sum of the stages it needs, whether they ran for it or were already
    there, so every action of a query is costed the same way (`every_action` runs them all).
    """

    def __init__(self, index: DocumentIndex, embed_query: EmbedQuery, query: str, lexical: Ranking, k: int):
        self._index = index
        self._embed_query = embed_query
        self.query = query
        self.lexical = lexical
        self._k = k
        self._stages: dict[str, tuple[Any, Cost]] = {}
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def _stage(self, name: str, run: Callable[[], Awaitable[tuple[Any, float]]]) -> Any:
        """Run `run` once (it returns a value and its CPU ms); its wall time is measured here."""
        async with self._locks[name]:
            if name not in self._stages:
                started = time.perf_counter()
                value, cpu_ms = await run()
                self._stages[name] = value, Cost(cpu_ms, (time.perf_counter() - started) * 1000)
        return self._stages[name][0]

    async def _timed_sql(self, call: Awaitable[Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        value = await call
        return value, (time.perf_counter() - started) * 1000

    async def vector(self) -> np.ndarray:
        return await self._stage("embed", lambda: self._embed_query(self.query))

    async def dense(self) -> Ranking:
        vector = await self.vector()
        return await self._stage("dense", lambda: self._timed_sql(self._index.dense(vector, self._k)))

    async def prf_vector(self) -> np.ndarray:
        """The query vector plus the mean of its top PRF_DOCS dense hits' vectors, unit length."""
        dense, vector = await self.dense(), await self.vector()

        async def run() -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            top = await self._index.vectors([doc_id for doc_id, _ in dense[:PRF_DOCS]])
            moved = vector + np.mean(list(top.values()), axis=0) if top else vector
            return moved / max(float(np.linalg.norm(moved)), 1e-12), (time.perf_counter() - started) * 1000

        return await self._stage("prf_vectors", run)

    async def prf_dense(self) -> Ranking:
        vector = await self.prf_vector()
        return await self._stage("prf_dense", lambda: self._timed_sql(self._index.dense(vector, self._k)))

    async def complete_scores(self, prf: bool) -> tuple[dict[str, float], dict[str, float]]:
        """(BM25, cosine) of every candidate of the lexical and the (PRF) dense list."""
        dense = await (self.prf_dense() if prf else self.dense())
        vector = await (self.prf_vector() if prf else self.vector())

        async def run() -> tuple[tuple[dict[str, float], dict[str, float]], float]:
            started = time.perf_counter()
            lexical, cosine = dict(self.lexical), dict(dense)
            missing_lexical = [d for d in cosine if d not in lexical]
            missing_dense = [d for d in lexical if d not in cosine]
            more_lexical, more_cosine = await asyncio.gather(
                self._index.lexical_scores(self.query, missing_lexical),
                self._index.dense_scores(vector, missing_dense))
            return ({**more_lexical, **lexical}, {**more_cosine, **cosine}), (time.perf_counter() - started) * 1000

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

    async def _lexical(self, query: str, depth: int) -> tuple[_QueryWork, np.ndarray]:
        """The lexical stage, and the context it gives the policy."""
        k = max(depth, self._settings.candidates)
        lexical, idf = await self._index.lexical_with_idf(query, k)
        context = lexical_context(query, [score for _, score in lexical], idf, k)
        return _QueryWork(self._index, self._embed_query, query, lexical, k), context

    async def _strategy(self, work: _QueryWork, strategy: Strategy, depth: int) -> Ranking:
        """One of the original strategies, as it always ranked (partial-list fusion)."""
        if strategy is Strategy.LEXICAL:
            ranking, _ = await work.run(RetrievalAction(None), depth)
            return ranking
        dense = await work.dense()
        if strategy is Strategy.DENSE:
            return dense[:depth]
        if strategy is Strategy.HYBRID_RRF:
            return reciprocal_rank_fusion([work.lexical, dense], self._settings.rrf_k)[:depth]
        return weighted_score_fusion(work.lexical, dense, self._settings.fusion_weight)[:depth]

    async def _serve(self, query: str, depth: int, requested: Strategy | None,
                     config: ArmConfig) -> tuple[Decision, Ranking, Cost, _QueryWork, np.ndarray]:
        work, context = await self._lexical(query, depth)
        policies = self._current_policy()
        decision = decide(context, requested, self._settings.default_strategy, self._settings.fusion_weight,
                          self.actions, policies.retrieval if policies else None, config.flags.soft_q_bandit,
                          self._rng)
        if decision.action is None:
            return decision, await self._strategy(work, Strategy(decision.strategy), depth), Cost(), work, context
        ranking, cost = await work.run(decision.action, depth)
        return decision, ranking, cost, work, context

    async def every_action(self, query: str, depth: int) -> tuple[list[float], list[tuple[list[str], Cost]]]:
        """The context and, for every action in order, the ids it serves and its cost.

        Graded feedback rewards every action this way, off the request path.
        """
        work, context = await self._lexical(query, depth)
        outcomes = [await work.run(action, depth) for action in self.actions]
        return context.tolist(), [([doc_id for doc_id, _ in ranking], cost) for ranking, cost in outcomes]

    async def _retrieve(self, request: SearchRequest, config: ArmConfig) -> _Retrieved:
        """The lexical stage, the decision, the fused and fetched hits."""
        query, final_topk = request.q, request.final_topk
        decision, ranking, cost, work, context = await self._serve(query, final_topk, request.strategy, config)
        documents = await self._index.fetch([doc_id for doc_id, _ in ranking])
        ranking = [(doc_id, score) for doc_id, score in ranking if doc_id in documents]
        hits = SearchHits(
            search_id=uuid.uuid4().hex,
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
        return _Retrieved(hits, [documents[doc_id] for doc_id, _ in ranking], final_topk, decision, context,
                          cost, work.state_key())

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
            context=retrieved.context.tolist(), action=decision.index, strategy=decision.strategy,
            propensity=decision.propensity, policy_version=decision.policy_version,
            served_doc_ids=[hit.doc_id for hit in retrieved.hits.hits],
            action_probabilities=list(decision.probabilities), answer_mode=answer.strategy,
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
            request.q, retrieved.documents, answer_decision.strategy, deadline, request.debug))
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
            pieces = self._composer.stream(request.q, retrieved.documents, answer_decision.strategy, deadline,
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
        decision, ranking, cost, work, context = await self._serve(request.q, request.depth, request.strategy, config)
        actions = None
        if request.every_action:
            outcomes = [await work.run(action, request.depth) for action in self.actions]
            actions = [ActionRanking(name=action.name, doc_ids=[d for d, _ in ranked], cpu_ms=c.cpu_ms, wall_ms=c.wall_ms)
                       for action, (ranked, c) in zip(self.actions, outcomes, strict=True)]
        return RankResponse(
            query=request.q,
            strategy=decision.strategy,
            state_key=work.state_key(),
            context=context.tolist(),
            ranking=[RankedId(doc_id=d, score=s) for d, s in ranking],
            cost_cpu_ms=cost.cpu_ms,
            actions=actions,
            arm=self.arm,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    async def ping_database(self) -> None:
        await self._index.ping()
