"""Feedback: join a user's judgements to the served search and turn them into rewards.

Graded judgements are about documents, not about the list that was served, so the same reward
function also scores the list every other strategy would have served for that search (recorded
with it): one feedback teaches every action of its state, not only the one the bandit tried
(full-information feedback). A document nobody judged counts as not relevant, in the served
list and in the others alike, as nDCG always does. Clicks say nothing about documents the user
never saw, so they reward the served strategy only.

The served search reaches the `experiences` table a few milliseconds after its response (the
experience log writes in batches), so a lookup that misses waits briefly before answering 404.
Recording is idempotent per part: the first document feedback fixes the rewards, the first rating
of the answer (helpful or not, or a grade; stored on [0, 1] for learning the answer mode) fixes
that; a repeat returns what is stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import asyncpg

from cluster.platform.database import unavailable_on_connection_errors
from learners.learning_core import Experience, RewardedSearch
from learners.reward import judgements_from_clicks, reward
from serve_app.schemas import FeedbackRequest

_ARRIVAL_WAIT_S = 2.0
_POLL_S = 0.05

_SERVED = """
SELECT created_at, arm, session_id, state_key, action, propensity, policy_version, served_doc_ids,
       strategy_doc_ids, action_probabilities, reward, action_rewards, answer_rating
FROM experiences WHERE search_id = $1"""

_NEXT_IN_SESSION = """
SELECT state_key FROM experiences
WHERE session_id = $1 AND created_at > $2 ORDER BY created_at LIMIT 1"""

_RECORD = """
UPDATE experiences
SET reward = $2, next_state_key = $3, feedback = $4::jsonb, action_rewards = $5, feedback_at = now()
WHERE search_id = $1 AND reward IS NULL
RETURNING search_id"""

_RATE_ANSWER = """
UPDATE experiences SET answer_rating = $2, answer_rated_at = now()
WHERE search_id = $1 AND answer_rating IS NULL
RETURNING answer_rating"""


class UnknownSearch(LookupError):
    """No served search has this id (or it was served with experience_replay off)."""


@dataclasses.dataclass(frozen=True)
class FeedbackOutcome:
    search_id: str
    arm: str
    reward: float | None  # of the served list; None while no document feedback came
    action_rewards: list[float] | None  # of every action's list; None for clicks
    answer_rating: float | None  # on [0, 1], as stored
    duplicate: bool  # every part given was recorded before
    experiences: list[Experience]  # what to add to the replay; empty unless a reward is new


class FeedbackStore:
    def __init__(self, pool: asyncpg.Pool, arrival_wait_s: float = _ARRIVAL_WAIT_S):
        self._pool = pool
        self._arrival_wait_s = arrival_wait_s

    async def _served(self, search_id: str) -> asyncpg.Record:
        deadline = time.monotonic() + self._arrival_wait_s
        while True:
            row = await self._pool.fetchrow(_SERVED, search_id)
            if row is not None:
                return row
            if time.monotonic() >= deadline:
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
            if request.judgements is None and request.clicks is None:
                return FeedbackOutcome(request.search_id, served["arm"], served["reward"], served["action_rewards"],
                                       rating, not rating_is_new, [])
            outcome = await self._reward_documents(request, served)
        duplicate = outcome.duplicate and (request.answer_rating is None or not rating_is_new)
        return dataclasses.replace(outcome, answer_rating=rating, duplicate=duplicate)

    async def _rate_answer(self, request: FeedbackRequest, served: asyncpg.Record) -> tuple[float | None, bool]:
        """(the stored rating, whether this request stored it)."""
        score = request.answer_score()
        if score is None or served["answer_rating"] is not None:
            return served["answer_rating"], False
        stored = await self._pool.fetchval(_RATE_ANSWER, request.search_id, score)
        if stored is None:  # a concurrent rating won the race
            return await self._pool.fetchval(
                "SELECT answer_rating FROM experiences WHERE search_id = $1", request.search_id), False
        return stored, True

    async def _reward_documents(self, request: FeedbackRequest, served: asyncpg.Record) -> FeedbackOutcome:
        """The reward of the served list (and, for graded judgements, of every strategy's), once."""
        search_id = request.search_id
        graded = request.judgements is not None
        if request.judgements is not None:
            judgements = {doc_id: float(grade) for doc_id, grade in request.judgements.items()}
        else:
            judgements = judgements_from_clicks(request.clicks or [])
        if served["reward"] is not None:
            return FeedbackOutcome(search_id, served["arm"], served["reward"], served["action_rewards"], None,
                                   True, [])
        value = reward(served["served_doc_ids"], judgements)
        action_rewards = None
        if graded and served["strategy_doc_ids"] is not None:
            action_rewards = [reward(ids, judgements) for ids in json.loads(served["strategy_doc_ids"])]
        next_state = None
        if served["session_id"]:
            next_state = await self._pool.fetchval(_NEXT_IN_SESSION, served["session_id"], served["created_at"])
        raw = request.model_dump(exclude_none=True)
        updated = await self._pool.fetchval(_RECORD, search_id, value, next_state, json.dumps(raw), action_rewards)
        if updated is None:  # a concurrent repeat won the race
            stored = await self._pool.fetchrow(
                "SELECT reward, action_rewards FROM experiences WHERE search_id = $1", search_id)
            return FeedbackOutcome(search_id, served["arm"], stored["reward"], stored["action_rewards"], None,
                                   True, [])
        experiences = RewardedSearch(
            state_key=served["state_key"], action=served["action"], reward=value,
            propensity=served["propensity"], policy_version=served["policy_version"],
            next_state_key=next_state, action_rewards=action_rewards,
            action_probabilities=served["action_probabilities"],
        ).experiences()
        return FeedbackOutcome(search_id, served["arm"], value, action_rewards, None, False, experiences)
