"""`dtrag train`: teach the live policy with a simulated user, score it offline, over several seeds.

Per seed the service's learning is reset (a fresh model), then:
1. Every test query is ranked once under every action (`/api/v1/rank` with `every_action`, which
   is not logged as an experience): each action's list, its CPU cost, and the query's context.
   That matrix scores any model offline (`learners.policy_scores`).
2. A simulated user searches training queries (the policy, or the default when the bandit flag
   is off, picks each action) and sends their qrels as graded judgements; the service rewards
   every action (nDCG - cost_weight * CPU ms) and its learners fit the model in the background.
3. At milestones (200 and 500 judged queries, the end) and along a curve, learning is let to
   catch up and the model is fetched; the snapshots are scored on the test matrix.

An item the service refuses (a 4xx for one search or feedback) is counted and skipped, and a
query judged on more documents than the API takes is trimmed to its highest grades: one bad item
never ends a run.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from cluster.core.actions import LEXICAL_ONLY
from cluster.data.beir import load_split
from learners.learning_core import policy_from_report
from learners.policy_scores import TestMatrix
from learners.ranking_metrics import ndcg_at_k
from learners.value_model import ValueSnapshot

FINAL_TOPK = 10
EVAL_DEPTH = 10
MILESTONES = (200, 500)  # judged queries at which the checks look at the policy
CURVE_POINTS = 10  # snapshots along the run, at least MIN_CURVE_STEP judged queries apart
MIN_CURVE_STEP = 10
MAX_JUDGEMENTS = 1000  # what /api/v1/feedback accepts per request
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


class ItemRejected(Exception):
    """The service refused one search or feedback (HTTP 4xx): counted, and the run goes on."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The service's model after `judged` judged queries."""

    judged: int
    policy: ValueSnapshot
    report: dict[str, Any]  # the model as /api/v1/admin/learning shows it


@dataclasses.dataclass
class SeedRun:
    seed: int
    split: str
    test: TestMatrix
    snapshots: list[Snapshot]
    train_quality: list[list[float]]  # per judged training query, every action's nDCG
    train_reward: list[list[float]]  # and its reward
    served: collections.Counter[str]  # actions the policy served during training
    skipped: collections.Counter[str]  # items the service refused, by reason
    trimmed: int  # queries whose judgements were cut to MAX_JUDGEMENTS

    def snapshot_at(self, judged: int) -> Snapshot:
        """The first snapshot taken once `judged` queries were judged (the last one if never)."""
        return next((s for s in self.snapshots if s.judged >= judged), self.snapshots[-1])

    def best_fixed(self, judged: int, by_reward: bool) -> int:
        """The action with the best mean over the first `judged` training queries (what a person would pick)."""
        rows = np.asarray((self.train_reward if by_reward else self.train_quality)[:judged])
        return int(rows.mean(axis=0).argmax())


@dataclasses.dataclass(frozen=True)
class TrainingReport:
    dataset: str
    actions: list[str]
    cost_weight: float
    judged: int
    runs: list[SeedRun]

    @property
    def final_judged(self) -> int:
        return min(run.snapshots[-1].judged for run in self.runs)


async def _call(client: httpx.AsyncClient, method: str, path: str, body: object = None,
                unavailable_s: float = CATCH_UP_TIMEOUT_S) -> dict[str, Any]:
    """One API call; a 503 (e.g. the learning state still loading after `dtrag up`) is retried for
    up to `unavailable_s`, every other failure ends the run or, for one item, is ItemRejected."""
    deadline = time.monotonic() + unavailable_s
    while True:
        try:
            response = await client.request(method, path, json=body)
        except httpx.TransportError as error:
            raise TrainingError(
                f"cannot reach the service at {client.base_url}: {error!r}; is `dtrag up` running?"
            ) from error
        if response.status_code != 503 or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    if response.status_code == 404 and path == "/api/v1/feedback":
        raise TrainingError(FLAGS_OFF)
    if 400 <= response.status_code < 500 and path in ("/api/v1/search/", "/api/v1/feedback"):
        raise ItemRejected(f"{path} HTTP {response.status_code}")
    if response.status_code != 200:
        raise TrainingError(f"{method} {path}: HTTP {response.status_code} {response.text}")
    return response.json()


def _judgements(qrels: dict[str, float]) -> tuple[dict[str, int], bool]:
    """The qrels as the API takes them: at most MAX_JUDGEMENTS, the highest grades kept; (judgements, trimmed)."""
    ranked = sorted(qrels.items(), key=lambda item: (-item[1], item[0]))
    return {doc: int(grade) for doc, grade in ranked[:MAX_JUDGEMENTS]}, len(ranked) > MAX_JUDGEMENTS


async def _learning(client: httpx.AsyncClient) -> dict[str, Any]:
    return await _call(client, "GET", "/api/v1/admin/learning")


async def _wait_for_learners(client: httpx.AsyncClient) -> dict[str, Any]:
    """Poll until learning caught up with the feedback: no update applied for SETTLE_S, or a
    learner step came back idle (rate limit or too little data) while none was applied."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    last = await _learning(client)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        now = await _learning(client)
        if now["state"]["updates_applied"] != last["state"]["updates_applied"]:
            quiet_since = time.monotonic()
        elif now["learners"]["idle"] > last["learners"]["idle"] or time.monotonic() - quiet_since >= SETTLE_S:
            return now
        last = now
    tqdm.write(f"warning: learning was still applying updates after {CATCH_UP_TIMEOUT_S:.0f} s")
    return last


async def rank_every_action(client: httpx.AsyncClient, queries: dict[str, str],
                            qrels: dict[str, dict[str, float]], actions: list[str], concurrency: int,
                            desc: str) -> TestMatrix:
    """Every query under every action: nDCG@10, CPU ms and the query's context (not logged as experience)."""
    semaphore = asyncio.Semaphore(concurrency)
    ids = list(queries)
    contexts: list[list[float]] = [[] for _ in ids]
    quality = np.zeros((len(ids), len(actions)))
    cost = np.zeros_like(quality)

    async def rank(row: int, progress: tqdm) -> None:
        qid = ids[row]
        async with semaphore:
            ranked = await _call(client, "POST", "/api/v1/rank",
                                 {"q": queries[qid], "depth": EVAL_DEPTH, "every_action": True})
        if [a["name"] for a in ranked["actions"]] != actions:
            raise TrainingError(f"the service ranks actions {[a['name'] for a in ranked['actions']]}, "
                                f"its model has {actions}")
        contexts[row] = ranked["context"]
        for a, action in enumerate(ranked["actions"]):
            quality[row, a] = ndcg_at_k(action["doc_ids"], qrels[qid], 10)
            cost[row, a] = action["cpu_ms"]
        progress.update(1)

    with tqdm(total=len(ids), desc=desc, unit="q") as progress:
        await asyncio.gather(*(rank(r, progress) for r in range(len(ids))))
    dense = np.array([name != LEXICAL_ONLY for name in actions])
    return TestMatrix(ids, np.array(contexts), quality, cost, dense)


async def _train_seed(client: httpx.AsyncClient, dataset: Path, seed: int, judged: int,
                      concurrency: int) -> SeedRun:
    await _call(client, "POST", "/api/v1/admin/learning/reset")
    learning = await _learning(client)
    actions = learning["model"]["actions"]
    split = load_split(dataset, seed)
    test = await rank_every_action(client, split.test, split.test_qrels, actions, concurrency,
                                   "rank test queries under every action")
    run = SeedRun(seed, split.description, test, [Snapshot(0, policy_from_report(learning["model"]),
                                                            learning["model"])],
                  [], [], collections.Counter(), collections.Counter(), 0)
    shuffler = random.Random(seed)
    order: list[str] = []
    while len(order) < 2 * judged:  # passes over the training queries, each in a new order (room for refusals)
        epoch = sorted(split.train)
        shuffler.shuffle(epoch)
        order += epoch
    step = max(MIN_CURVE_STEP, judged // CURVE_POINTS)
    stops = sorted({*range(step, judged, step), *(m for m in MILESTONES if m < judged), judged})
    attempts = 0  # queries tried, rejected ones included, so a refused item never repeats forever
    claimed = 0  # judged queries done or in flight
    with tqdm(total=judged, desc=f"seed {seed}: judged queries", unit="q") as progress:
        for stop in stops:
            pending = iter(order[attempts:])

            async def user() -> None:
                nonlocal attempts, claimed
                for qid in pending:  # one shared iterator: users take queries in the shuffled order
                    if claimed >= stop:  # a slot is claimed before the search, so a stop is exact
                        return
                    claimed += 1
                    attempts += 1
                    judgements, trimmed = _judgements(split.train_qrels[qid])
                    run.trimmed += trimmed
                    try:
                        hit = await _call(client, "POST", "/api/v1/search/", {"q": split.train[qid],
                                                                                "final_topk": FINAL_TOPK})
                        feedback = await _call(client, "POST", "/api/v1/feedback",
                                               {"search_id": hit["search_id"], "judgements": judgements})
                    except ItemRejected as rejected:
                        run.skipped[str(rejected)] += 1
                        claimed -= 1
                        continue
                    if feedback["action_quality"] is None:
                        run.skipped["feedback without every action's reward"] += 1
                        claimed -= 1
                        continue
                    run.train_quality.append([feedback["action_quality"][a] for a in actions])
                    run.train_reward.append([feedback["action_rewards"][a] for a in actions])
                    run.served[hit["strategy"]] += 1
                    progress.update(1)

            users = [asyncio.create_task(user()) for _ in range(concurrency)]
            try:
                await asyncio.gather(*users)
            finally:  # the first failure (e.g. flags off) stops the other users
                for task in users:
                    task.cancel()
            if len(run.train_quality) < stop:  # the queries ran out: too many were refused
                raise TrainingError(f"seed {seed}: only {len(run.train_quality)} of {judged} queries were "
                                    f"judged; the service refused the others ({dict(run.skipped)})")
            learning = await _wait_for_learners(client)
            run.snapshots.append(Snapshot(len(run.train_quality), policy_from_report(learning["model"]),
                                          learning["model"]))
    return run


async def _train(client: httpx.AsyncClient, dataset: Path, seeds: list[int], judged: int,
                 concurrency: int) -> TrainingReport:
    learning = await _learning(client)
    runs = [await _train_seed(client, dataset, seed, judged, concurrency) for seed in seeds]
    return TrainingReport(dataset.resolve().name, learning["model"]["actions"], learning["cost_weight"], judged, runs)


def train_dataset(
    dataset: Path,
    url: str,
    api_key: str,
    *,
    seeds: list[int],
    judged: int = 1000,
    concurrency: int = 4,
) -> TrainingReport:
    """Train the running service from scratch once per seed and score each run on the test queries."""
    if judged < 1 or concurrency < 1 or not seeds:
        raise ValueError(f"need judged >= 1, concurrency >= 1 and a seed, got {judged}, {concurrency}, {seeds}")

    async def run() -> TrainingReport:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": api_key},
                                     timeout=REQUEST_TIMEOUT_S) as client:
            return await _train(client, dataset, seeds, judged, concurrency)

    return asyncio.run(run())
