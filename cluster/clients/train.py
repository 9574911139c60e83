"""`dtrag train`: teach the live soft-Q bandit with a simulated user, then score what it learned.

The simulated user searches each training query with no strategy, so the service's bandit picks
one from softmax(Q(s,.)/tau), and sends the query's qrels as graded judgements; the service turns
them into rewards (nDCG of the served list, and of the list each other strategy would have
served) and its learners update Q in the background.

Scoring never goes through the bandit: every test query is ranked once under every fixed strategy
(`/api/v1/rank`, which is not logged as an experience). That gives a (queries x strategies) matrix
of nDCG@10 and each query's state key, so any Q-table (the final one, or the snapshots taken
during training for the learning curve) is scored offline (`learners.policy_scores`). The
rankings name their strategy, so they do not depend on the policy: they are fetched after
training, which lets a service with the learning flags off fail at the first feedback.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from cluster.core.vocabulary import STRATEGIES
from cluster.data.beir import QuerySplit, load_split
from learners.policy_scores import expected_ndcg, greedy_actions, mean_ndcg, oracle_actions
from learners.ranking_metrics import ndcg_at_k

FINAL_TOPK = 10
EVAL_DEPTH = 10
POINTS_PER_EPOCH = 10
SETTLE_S = 2.0
CATCH_UP_TIMEOUT_S = 120.0
POLL_S = 0.5
REQUEST_TIMEOUT_S = 60.0
FLAGS_OFF = (
    "the service does not record searches for feedback (HTTP 404): start it with "
    "FEATURE_EXPERIENCE_REPLAY=on FEATURE_SOFT_Q_BANDIT=on dtrag up"
)

class TrainingError(Exception):
    """The service cannot be trained as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class TestRankings:
    """Every test query under every fixed strategy, computed once."""

    query_ids: list[str]
    states: list[str]
    scores: np.ndarray  # (queries, len(STRATEGIES)): nDCG@10


@dataclasses.dataclass(frozen=True)
class PolicyScores:
    fixed: dict[str, float]
    greedy: float
    served: float
    oracle: float

    @property
    def best_fixed(self) -> str:
        return max(self.fixed, key=self.fixed.__getitem__)


def score_policies(test: TestRankings, snapshot: Snapshot) -> PolicyScores:
    fixed = {s: float(test.scores[:, a].mean()) for a, s in enumerate(STRATEGIES)}
    return PolicyScores(
        fixed=fixed,
        greedy=mean_ndcg(test.scores, greedy_actions(test.states, snapshot.q, snapshot.pooled)),
        served=expected_ndcg(test.scores, test.states, snapshot.q, snapshot.pooled, snapshot.tau),
        oracle=mean_ndcg(test.scores, oracle_actions(test.scores, test.states)),
    )


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The service's Q-table after `feedbacks` feedbacks."""

    feedbacks: int
    q: dict[str, list[float]]
    pooled: list[float]  # Q of a state not in `q`
    tau: float


@dataclasses.dataclass(frozen=True)
class EpochSummary:
    feedbacks: int
    mean_reward: float
    strategies: dict[str, int]
    learning: dict[str, Any]  # /api/v1/admin/learning "state" once learning caught up
    caught_up: bool


@dataclasses.dataclass(frozen=True)
class TrainingReport:
    dataset: str
    split: str
    started_from: dict[str, Any]  # learning "state" before training
    epochs: list[EpochSummary]
    test: TestRankings
    snapshots: list[Snapshot]
    scores: PolicyScores

    @property
    def final(self) -> Snapshot:
        return self.snapshots[-1]

    def curve(self) -> list[tuple[int, float]]:
        """(feedbacks, greedy nDCG@10 on the test queries) for every snapshot."""
        return [
            (s.feedbacks, mean_ndcg(self.test.scores, greedy_actions(self.test.states, s.q, s.pooled)))
            for s in self.snapshots
        ]


async def _call(client: httpx.AsyncClient, method: str, path: str, body: object = None) -> dict[str, Any]:
    try:
        response = await client.request(method, path, json=body)
    except httpx.TransportError as error:
        raise TrainingError(
            f"cannot reach the service at {client.base_url}: {error!r}; is `dtrag up` running?"
        ) from error
    if response.status_code == 404 and path == "/api/v1/feedback":
        raise TrainingError(FLAGS_OFF)
    if response.status_code != 200:
        raise TrainingError(f"{method} {path}: HTTP {response.status_code} {response.text}")
    return response.json()


async def _learning(client: httpx.AsyncClient) -> dict[str, Any]:
    payload = await _call(client, "GET", "/api/v1/admin/learning")
    actions = payload["q_table"]["actions"]
    if actions != list(STRATEGIES):
        raise TrainingError(f"the service's actions {actions} are not {list(STRATEGIES)}")
    return payload


def _snapshot(feedbacks: int, learning: dict[str, Any]) -> Snapshot:
    table = learning["q_table"]
    return Snapshot(feedbacks, table["q"], table["pooled"], table["tau"])


async def _wait_for_learners(client: httpx.AsyncClient) -> tuple[dict[str, Any], bool]:
    """Poll until learning caught up with the feedback; (last payload, whether it did in time).

    Caught up: no update applied for SETTLE_S, or a learner step came back idle (rate limit or
    too little data) while none was applied.
    """
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    last = await _learning(client)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        now = await _learning(client)
        if now["state"]["updates_applied"] != last["state"]["updates_applied"]:
            quiet_since = time.monotonic()
        elif now["learners"]["idle"] > last["learners"]["idle"] or time.monotonic() - quiet_since >= SETTLE_S:
            return now, True
        last = now
    return last, False


async def _rank_test(client: httpx.AsyncClient, split: QuerySplit, concurrency: int) -> TestRankings:
    """nDCG@10 of every test query under every strategy, and each query's state key."""
    semaphore = asyncio.Semaphore(concurrency)
    ids = list(split.test)
    scores = np.zeros((len(ids), len(STRATEGIES)))
    states: dict[str, str] = {}

    async def rank(row: int, action: int, progress: tqdm) -> None:
        qid = ids[row]
        async with semaphore:
            ranked = await _call(client, "POST", "/api/v1/rank",
                                 {"q": split.test[qid], "strategy": STRATEGIES[action], "depth": EVAL_DEPTH})
        scores[row, action] = ndcg_at_k([r["doc_id"] for r in ranked["ranking"]], split.test_qrels[qid], 10)
        states[qid] = ranked["state_key"]  # the same under every strategy: it precedes fusion
        progress.update(1)

    with tqdm(total=scores.size, desc="rank test queries", unit="q") as progress:
        await asyncio.gather(*(rank(r, a, progress) for r in range(len(ids)) for a in range(len(STRATEGIES))))
    return TestRankings(ids, [states[q] for q in ids], scores)


async def _epoch(
    client: httpx.AsyncClient, split: QuerySplit, order: list[str], done_before: int,
    every: int, concurrency: int, label: str, snapshots: list[Snapshot],
) -> tuple[list[float], collections.Counter[str]]:
    """The simulated user on each query of `order`; snapshots Q every `every` feedbacks."""
    pending = iter(order)
    rewards: list[float] = []
    served: collections.Counter[str] = collections.Counter()

    async def user(progress: tqdm) -> None:
        for qid in pending:  # one shared iterator: users take queries in the shuffled order
            hit = await _call(client, "POST", "/api/v1/search/",
                              {"q": split.train[qid], "final_topk": FINAL_TOPK})
            judgements = {doc: int(grade) for doc, grade in split.train_qrels[qid].items()}
            feedback = await _call(client, "POST", "/api/v1/feedback",
                                   {"search_id": hit["search_id"], "judgements": judgements})
            rewards.append(feedback["reward"])
            served[hit["strategy"]] += 1
            progress.update(1)
            progress.set_postfix(reward=f"{statistics.fmean(rewards):.3f}")
            done = done_before + len(rewards)
            if done % every == 0:
                snapshots.append(_snapshot(done, await _learning(client)))

    with tqdm(total=len(order), desc=label, unit="q") as progress:
        users = [asyncio.create_task(user(progress)) for _ in range(concurrency)]
        try:
            await asyncio.gather(*users)
        finally:  # the first failure (e.g. flags off) stops the other users
            for task in users:
                task.cancel()
    return rewards, served


async def _train(
    client: httpx.AsyncClient, split: QuerySplit, epochs: int, concurrency: int, seed: int,
    dataset: str,
) -> TrainingReport:
    start = await _learning(client)
    if start["state"]["inserted"]:
        tqdm.write(f"note: the service already learned from {start['state']['inserted']} feedbacks "
                   f"(policy version {start['state']['policy_version']}); training continues from there")
    snapshots = [_snapshot(0, start)]
    every = max(1, math.ceil(len(split.train) / POINTS_PER_EPOCH))
    shuffler = random.Random(seed)
    summaries: list[EpochSummary] = []
    for epoch in range(1, epochs + 1):
        order = sorted(split.train)
        shuffler.shuffle(order)
        done_before = len(split.train) * (epoch - 1)
        rewards, served = await _epoch(client, split, order, done_before, every, concurrency,
                                       f"epoch {epoch}/{epochs}", snapshots)
        learning, caught_up = await _wait_for_learners(client)
        if not caught_up:
            tqdm.write(f"warning: learning was still applying updates after {CATCH_UP_TIMEOUT_S:.0f} s")
        if epoch == 1 and len(served) == 1:  # the policy starts uniform; one strategy means no bandit
            tqdm.write(f"warning: every search was served with {next(iter(served))}: "
                       "is FEATURE_SOFT_Q_BANDIT on?")
        feedbacks = done_before + len(rewards)
        snapshots.append(_snapshot(feedbacks, learning))
        summaries.append(EpochSummary(feedbacks, statistics.fmean(rewards), dict(served),
                                      learning["state"], caught_up))
    snapshots.sort(key=lambda s: s.feedbacks)  # stable: the end-of-epoch snapshot stays last
    final = snapshots[-1]
    test = await _rank_test(client, split, concurrency)
    scores = score_policies(test, final)
    return TrainingReport(dataset, split.description, start["state"], summaries,
                          test, snapshots, scores)


def train_dataset(
    dataset: Path,
    url: str,
    api_key: str,
    *,
    epochs: int = 3,
    concurrency: int = 4,
    seed: int = 0,
) -> TrainingReport:
    """Train the running service on the dataset's training queries and score it on its test queries."""
    if epochs < 1 or concurrency < 1:
        raise ValueError(f"epochs and concurrency must be >= 1, got {epochs}, {concurrency}")
    split = load_split(dataset, seed)

    async def run() -> TrainingReport:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": api_key},
                                     timeout=REQUEST_TIMEOUT_S) as client:
            return await _train(client, split, epochs, concurrency, seed, dataset.resolve().name)

    return asyncio.run(run())
