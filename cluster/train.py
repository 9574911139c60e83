"""`dtrag train`: teach the live soft-Q bandit with a simulated user, then score what it learned.

The simulated user searches each training query with no strategy, so the service's bandit picks
one from softmax(Q(s,.)/tau), and sends the query's qrels as graded judgements; the service turns
them into rewards (nDCG of the served list, and of the list each other strategy would have
served) and its learners update Q in the background.

Scoring never goes through the bandit: every test query is ranked once under every fixed strategy
(`/api/v1/rank`, which is not logged as an experience). That gives a (queries x strategies) matrix
of nDCG@10 and each query's state key, so any Q-table (the final one, or the snapshots taken
during training for the learning curve) is scored offline with the plain functions below. The
rankings name their strategy, so they do not depend on the policy: they are fetched after
training, which lets a service with the learning flags off fail at the first feedback.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from cluster.evaluate import load_qrels, load_queries
from cluster.settings import STRATEGIES
from learners.ranking_metrics import ndcg_at_k
from learners.soft_q import policy_from_q

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

QTable = Mapping[str, Sequence[float]]


class TrainingError(Exception):
    """The service cannot be trained as asked; the message says what to do."""


# --- pure math: policies over a (queries x strategies) nDCG matrix ---------------------------


def split_half(ids: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, test): the ids shuffled by `seed`, first half (rounded down) to train.

    Sorting first makes the split depend on the ids and the seed only, not on file order.
    """
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    half = len(shuffled) // 2
    return sorted(shuffled[:half]), sorted(shuffled[half:])


def q_rows(states: Sequence[str], q_table: QTable, pooled: Sequence[float]) -> np.ndarray:
    """Q(s, .) per query; a state the table never saw has the pooled row, as in the service.

    Shape (queries, actions).
    """
    return np.array([q_table.get(s, pooled) for s in states], np.float64)


def greedy_actions(states: Sequence[str], q_table: QTable, pooled: Sequence[float]) -> np.ndarray:
    """argmax_a Q(s, a) per query (the first on ties); shape (queries,)."""
    return q_rows(states, q_table, pooled).argmax(axis=1)


def mean_ndcg(scores: np.ndarray, actions: np.ndarray) -> float:
    """Mean of scores[i, actions[i]]: the nDCG of the policy that serves actions[i] to query i."""
    return float(scores[np.arange(len(actions)), actions].mean())


def expected_ndcg(
    scores: np.ndarray, states: Sequence[str], q_table: QTable, pooled: Sequence[float], tau: float
) -> float:
    """Mean over queries of sum_a softmax(Q(s,.)/tau)(a) * scores[i, a]: what sampling earns."""
    return float((policy_from_q(q_rows(states, q_table, pooled), tau) * scores).sum(axis=1).mean())


def oracle_actions(scores: np.ndarray, states: Sequence[str]) -> np.ndarray:
    """Per state, the action with the best mean score over its queries (first on ties).

    No policy that sees only the state key can beat it on these queries: an upper bound.
    """
    rows: dict[str, list[int]] = collections.defaultdict(list)
    for i, state in enumerate(states):
        rows[state].append(i)
    best = {state: int(np.argmax(scores[i].mean(axis=0))) for state, i in rows.items()}
    return np.array([best[s] for s in states], np.int64)


# --- data -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuerySplit:
    train: dict[str, str]
    train_qrels: dict[str, dict[str, float]]
    test: dict[str, str]
    test_qrels: dict[str, dict[str, float]]
    description: str


def _judged(queries: dict[str, str], qrels: dict[str, dict[str, float]], source: str) -> dict[str, str]:
    judged = {qid: text for qid, text in queries.items() if qid in qrels}
    if not judged:
        raise ValueError(f"{source}: no query has judgements")
    return judged


def load_split(dataset: Path, seed: int) -> QuerySplit:
    """Train on BEIR's training qrels (`extra/`) when present, else on half the test queries."""
    test_qrels = load_qrels(dataset / "qrels" / "test.tsv")
    test = _judged(load_queries(dataset), test_qrels, f"{dataset}/qrels/test.tsv")
    extra = dataset / "extra"
    if (extra / "queries_all.jsonl").is_file() and (extra / "qrels_train.tsv").is_file():
        train_qrels = load_qrels(extra / "qrels_train.tsv")
        judged = _judged(load_queries(extra, "queries_all.jsonl"), train_qrels, f"{extra}/qrels_train.tsv")
        train = {qid: text for qid, text in judged.items() if qid not in test}  # keep test unseen
        description = (f"train: {len(train)} queries of extra/qrels_train.tsv; "
                       f"test: {len(test)} queries of qrels/test.tsv")
        return QuerySplit(train, train_qrels, test, test_qrels, description)
    train_ids, test_ids = split_half(list(test), seed)
    description = (f"no training qrels: the {len(test)} judged test queries split in halves by seed "
                   f"{seed}: train on {len(train_ids)}, test on the other {len(test_ids)}")
    return QuerySplit({q: test[q] for q in train_ids}, test_qrels,
                      {q: test[q] for q in test_ids}, test_qrels, description)


# --- scoring --------------------------------------------------------------------------------


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


# --- the service ----------------------------------------------------------------------------


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
    json_path: Path | None = None,
) -> TrainingReport:
    """Train the running service on the dataset's training queries and score it on its test queries."""
    if epochs < 1 or concurrency < 1:
        raise ValueError(f"epochs and concurrency must be >= 1, got {epochs}, {concurrency}")
    split = load_split(dataset, seed)

    async def run() -> TrainingReport:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": api_key},
                                     timeout=REQUEST_TIMEOUT_S) as client:
            return await _train(client, split, epochs, concurrency, seed, dataset.resolve().name)

    report = asyncio.run(run())
    if json_path:
        json_path.write_text(json.dumps(report_json(report), indent=1))
    return report


# --- output ---------------------------------------------------------------------------------


def report_json(report: TrainingReport) -> dict[str, Any]:
    test = report.test
    return {
        "dataset": report.dataset,
        "split": report.split,
        "started_from": report.started_from,
        "epochs": [dataclasses.asdict(e) for e in report.epochs],
        "scores": dataclasses.asdict(report.scores),
        "curve": report.curve(),
        "tau": report.final.tau,
        "q_table": report.final.q,
        "pooled": report.final.pooled,
        "test": {qid: {"state": state, "ndcg@10": dict(zip(STRATEGIES, row.tolist(), strict=True))}
                 for qid, state, row in zip(test.query_ids, test.states, test.scores, strict=True)},
    }


def format_scores(report: TrainingReport) -> str:
    """The policy table, then the gaps to the best fixed strategy and to the oracle."""
    s = report.scores
    rows = [(f"fixed: {name}", value) for name, value in s.fixed.items()]
    rows += [
        ("learned, greedy (argmax Q; an unseen state takes the pooled row)", s.greedy),
        (f"learned, as served (expected under softmax(Q/tau), tau {report.final.tau:g})", s.served),
        ("oracle per state (best strategy per state key on the test queries)", s.oracle),
    ]
    lines = ["| policy | nDCG@10 |", "|---|---:|"] + [f"| {name} | {value:.4f} |" for name, value in rows]
    best = s.best_fixed
    lines += [
        "",
        f"learned (greedy) - best fixed ({best}): {s.greedy - s.fixed[best]:+.4f}",
        f"oracle - learned (greedy): {s.oracle - s.greedy:+.4f}",
    ]
    return "\n".join(lines)


def format_states(report: TrainingReport) -> str:
    """Per state key: test queries, each strategy's mean nDCG@10, the learned and oracle choice."""
    test, q = report.test, report.final.q
    greedy = greedy_actions(test.states, q, report.final.pooled)
    oracle = oracle_actions(test.scores, test.states)
    header = "| state | test queries | " + " | ".join(STRATEGIES) + " | learned | oracle |"
    lines = [header, "|---|---:|" + "---:|" * len(STRATEGIES) + "---|---|"]
    by_state = collections.Counter(test.states)
    for state, count in by_state.most_common():
        i = test.states.index(state)
        mask = np.array([s == state for s in test.states])
        means = " | ".join(f"{v:.3f}" for v in test.scores[mask].mean(axis=0))
        learned = STRATEGIES[greedy[i]] + ("" if state in q else " (unseen)")
        lines.append(f"| `{state}` | {count} | {means} | {learned} | {STRATEGIES[oracle[i]]} |")
    return "\n".join(lines)


def format_report(report: TrainingReport) -> str:
    epochs = [
        f"epoch {i}: {e.feedbacks} feedbacks, mean reward {e.mean_reward:.4f}, served "
        + ", ".join(f"{s} {e.strategies.get(s, 0)}" for s in STRATEGIES)
        + f"; policy version {e.learning['policy_version']}, updates applied {e.learning['updates_applied']}"
        + ("" if e.caught_up else " (learning had not caught up)")
        for i, e in enumerate(report.epochs, start=1)
    ]
    return "\n".join([
        f"dataset {report.dataset}: {report.split}",
        *epochs,
        f"Q-table: {len(report.final.q)} states; test queries fall in {len(set(report.test.states))} states",
        "",
        format_scores(report),
        "",
        format_states(report),
    ])


def plot_learning_curve(report: TrainingReport, path: Path) -> None:
    """Greedy test nDCG@10 against feedbacks, with the best fixed strategy and the oracle."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    x, y = zip(*report.curve(), strict=True)
    scores = report.scores
    best = scores.best_fixed
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(x, y, marker="o", markersize=3, label="learned policy (greedy)")
    axes.axhline(scores.fixed[best], color="tab:gray", linestyle="--", label=f"best fixed ({best})")
    axes.axhline(scores.oracle, color="tab:green", linestyle=":", label="oracle per state")
    for epoch in report.epochs[:-1]:
        axes.axvline(epoch.feedbacks, color="0.85", linewidth=0.8)
    axes.set_xlabel("feedbacks")
    axes.set_ylabel(f"test nDCG@10 ({len(report.test.query_ids)} queries)")
    axes.set_title(f"dtrag train: {report.dataset}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)  # off the curve
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
