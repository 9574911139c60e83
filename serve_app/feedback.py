"""Feedback: join a user's judgements to the served search and turn them into rewards.

reward = quality - cost_weight * CPU ms: quality is the nDCG of the list against the judgements,
the cost what the action's stages took. Graded judgements are about documents, not about the
list that was served, so the query is ranked again here under every policy action (off the
request path: a skipped dense side runs now) and each action's list and cost give its reward:
one feedback teaches every action, not only the one served (full-information feedback). A
document nobody judged counts as not relevant, as nDCG always does. Clicks say nothing about
documents the user never saw, so they reward the served action only.

The served search reaches the `experiences` table a few milliseconds after its response (the
experience log writes in batches), so a lookup that misses waits briefly before answering 404,
but only while the search may still be on its way: its id says when it was minted
(`serve_app.search_ids`), and one older than `in_flight_s` is answered 404 at once.
Recording is idempotent per part: the first document feedback fixes the rewards, the first rating
of the answer (helpful or not, or a grade; stored on [0, 1] for learning the answer mode) fixes
that; a repeat returns what is stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable

import asyncpg

from cluster.platform.database import unavailable_on_connection_errors
from learners.learning_core import RewardedSearch
from learners.reward import judgements_from_clicks, reward
from serve_app.schemas import FeedbackRequest
from serve_app.search_ids import may_be_in_flight

_ARRIVAL_WAIT_S = 2.0
_POLL_S = 0.05

_SERVED = """
SELECT created_at, arm, session_id, query, depth, context, action, propensity, policy_version,
       served_doc_ids, action_probabilities, cost_cpu_ms, quality, reward, action_quality, action_rewards,
       answer_rating, answer_action, answer_propensity, answer_probabilities, answer_cost_cpu_ms
FROM experiences WHERE search_id = $1"""

_NEXT_IN_SESSION = """
SELECT context FROM experiences
WHERE session_id = $1 AND created_at > $2 ORDER BY created_at LIMIT 1"""

_RECORD = """
UPDATE experiences
SET quality = $2, reward = $3, next_context = $4, feedback = $5::jsonb, action_quality = $6,
    action_costs = $7, action_rewards = $8, feedback_at = now()
WHERE search_id = $1 AND reward IS NULL
RETURNING search_id"""

# Per action, over the latest graded feedback: mean nDCG and CPU ms of the list it served or would have.
_ACTION_AVERAGES = """
SELECT u.i - 1 AS action, count(*) AS searches, avg(u.q) AS quality, avg(u.c) AS cost_cpu_ms
FROM (SELECT action_quality, action_costs FROM experiences WHERE action_quality IS NOT NULL
      ORDER BY feedback_at DESC LIMIT $1) e,
     unnest(e.action_quality, e.action_costs) WITH ORDINALITY AS u(q, c, i)
GROUP BY u.i ORDER BY u.i"""

# (arm, query, depth) -> the context and every action's (ids, CPU ms), in action order.
RankEveryAction = Callable[[str, str, int], Awaitable[tuple[list[float], list[tuple[list[str], float]]]]]

_RATE_ANSWER = """
UPDATE experiences SET answer_rating = $2, answer_reward = $3, answer_rated_at = now()
WHERE search_id = $1 AND answer_rating IS NULL
RETURNING answer_rating"""


class UnknownSearch(LookupError):
    """No served search has this id (or it was served with experience_replay off)."""


@dataclasses.dataclass(frozen=True)
class FeedbackOutcome:
    search_id: str
    arm: str
    quality: float | None  # nDCG of the served list; None while no document feedback came
    cost_cpu_ms: float | None  # of the served action
    action_quality: list[float] | None  # every action's nDCG; None for clicks
    action_rewards: list[float] | None  # every action's reward; None for clicks
    answer_rating: float | None  # on [0, 1], as stored
    duplicate: bool  # every part given was recorded before
    searches: list[RewardedSearch]  # what the retrieval head learns from; empty unless a reward is new
    answer_searches: list[RewardedSearch] = dataclasses.field(default_factory=list)  # the answer head's


class FeedbackStore:
    def __init__(self, pool: asyncpg.Pool, cost_weight: float, rank_every_action: RankEveryAction,
                 in_flight_s: float, arrival_wait_s: float = _ARRIVAL_WAIT_S):
        """`in_flight_s`: how long after its id is minted a served search may still be on its way
        to the database (the request deadline, the log's flush interval and its write)."""
        self._pool = pool
        self._cost_weight = cost_weight
        self._rank_every_action = rank_every_action
        self._in_flight_s = in_flight_s
        self._arrival_wait_s = arrival_wait_s

    async def _served(self, search_id: str) -> asyncpg.Record:
        deadline = time.monotonic() + self._arrival_wait_s
        polls = may_be_in_flight(search_id, self._in_flight_s, time.time())
        while True:
            row = await self._pool.fetchrow(_SERVED, search_id)
            if row is not None:
                return row
            if not polls or time.monotonic() >= deadline:
                raise UnknownSearch(
                    f"no served search has id {search_id} (feedback is accepted for searches "
                    "served while the experience_replay flag was on)"
                )
            await asyncio.sleep(_POLL_S)

    async def record(self, request: FeedbackRequest) -> FeedbackOutcome:
        """Store each part of the feedback once: the documents' rewards, the answer's rating."""
        async with unavailable_on_connection_errors("feedback"):
            served = await self._served(request.search_id)
            rating, rating_is_new = await self._rate_answer(request, served)
            answer_searches = []
            if rating_is_new and served["answer_action"] is not None:
                answer_searches = [self._answer_search(served, rating)]
            if request.judgements is None and request.clicks is None:
                return FeedbackOutcome(request.search_id, served["arm"], served["quality"], served["cost_cpu_ms"],
                                       served["action_quality"], served["action_rewards"], rating,
                                       not rating_is_new, [], answer_searches)
            outcome = await self._reward_documents(request, served)
        duplicate = outcome.duplicate and (request.answer_rating is None or not rating_is_new)
        return dataclasses.replace(outcome, answer_rating=rating, duplicate=duplicate, answer_searches=answer_searches)

    def _answer_reward(self, served: asyncpg.Record, rating: float) -> float | None:
        """rating - cost_weight * CPU ms of composing the answer, when the answer policy chose its mode."""
        if served["answer_action"] is None:
            return None
        return rating - self._cost_weight * served["answer_cost_cpu_ms"]

    def _answer_search(self, served: asyncpg.Record, rating: float) -> RewardedSearch:
        """The answer head's experience: only the served mode is rated (bandit feedback)."""
        return RewardedSearch(context=served["context"], action=served["answer_action"], quality=rating,
                              cost=served["answer_cost_cpu_ms"], propensity=served["answer_propensity"],
                              policy_version=served["policy_version"])

    async def _rate_answer(self, request: FeedbackRequest, served: asyncpg.Record) -> tuple[float | None, bool]:
        """(the stored rating, whether this request stored it)."""
        score = request.answer_score()
        if score is None or served["answer_rating"] is not None:
            return served["answer_rating"], False
        stored = await self._pool.fetchval(_RATE_ANSWER, request.search_id, score, self._answer_reward(served, score))
        if stored is None:  # a concurrent rating won the race
            return await self._pool.fetchval(
                "SELECT answer_rating FROM experiences WHERE search_id = $1", request.search_id), False
        return stored, True

    async def _reward_documents(self, request: FeedbackRequest, served: asyncpg.Record) -> FeedbackOutcome:
        """The reward of the served list (and, for graded judgements, of every action's), once."""
        search_id = request.search_id
        if served["reward"] is not None:
            return self._recorded(search_id, served)
        graded = request.judgements is not None
        if request.judgements is not None:
            judgements = {doc_id: float(grade) for doc_id, grade in request.judgements.items()}
        else:
            judgements = judgements_from_clicks(request.clicks or [])
        quality = reward(served["served_doc_ids"], judgements)
        learnable = served["context"] is not None  # rows served before contexts were logged are not
        value = quality - self._cost_weight * (served["cost_cpu_ms"] or 0.0)
        action_quality = action_costs = action_rewards = None
        if graded and learnable:
            _, outcomes = await self._rank_every_action(served["arm"], served["query"], served["depth"])
            action_quality = [reward(ids, judgements) for ids, _ in outcomes]
            action_costs = [cpu_ms for _, cpu_ms in outcomes]
            # The served action is scored as served: its own list and its own cost.
            action_quality[served["action"]], action_costs[served["action"]] = quality, served["cost_cpu_ms"]
            action_rewards = [q - self._cost_weight * c for q, c in zip(action_quality, action_costs, strict=True)]
        next_context = None
        if served["session_id"]:
            next_context = await self._pool.fetchval(_NEXT_IN_SESSION, served["session_id"], served["created_at"])
        raw = request.model_dump(exclude_none=True)
        updated = await self._pool.fetchval(_RECORD, search_id, quality, value, next_context, json.dumps(raw),
                                            action_quality, action_costs, action_rewards)
        if updated is None:  # a concurrent repeat won the race
            return self._recorded(search_id, await self._pool.fetchrow(_SERVED, search_id))
        if not learnable:
            return FeedbackOutcome(search_id, served["arm"], quality, None, None, None, None, False, [])
        searched = RewardedSearch(
            context=served["context"], action=served["action"], quality=quality,
            cost=served["cost_cpu_ms"] or 0.0, propensity=served["propensity"],
            policy_version=served["policy_version"], next_context=next_context, action_quality=action_quality,
            action_costs=action_costs, action_probabilities=served["action_probabilities"],
        )
        return FeedbackOutcome(search_id, served["arm"], quality, served["cost_cpu_ms"], action_quality,
                               action_rewards, None, False, [searched])

    async def action_averages(self, actions: list[str], latest: int = 10_000) -> dict[str, dict[str, float]]:
        """Mean quality and CPU ms per action over the latest `latest` graded feedbacks."""
        async with unavailable_on_connection_errors("action averages"):
            rows = await self._pool.fetch(_ACTION_AVERAGES, latest)
        return {actions[row["action"]]: {"searches": row["searches"], "quality": row["quality"],
                                         "cost_cpu_ms": row["cost_cpu_ms"]}
                for row in rows if row["action"] < len(actions)}

    @staticmethod
    def _recorded(search_id: str, row: asyncpg.Record) -> FeedbackOutcome:
        """What an earlier feedback recorded (a repeat changes nothing)."""
        return FeedbackOutcome(search_id, row["arm"], row["quality"], row["cost_cpu_ms"], row["action_quality"],
                               row["action_rewards"], None, True, [])
