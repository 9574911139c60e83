"""`dtrag eval`: run a BEIR dataset's test queries through the live HTTP API and score them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from cluster.data.beir import load_qrels, load_queries
from learners.policy_scores import paired_bootstrap, queries_needed
from learners.ranking_metrics import ndcg_at_k, precision_at_k, recall_at_k

DEPTH = 100


@dataclasses.dataclass(frozen=True)
class StrategyResult:
    strategy: str
    queries: int
    ndcg_at_10: float
    p_at_5: float
    r_at_100: float
    per_query: dict[str, dict[str, float]]


SERVED = "served"  # no strategy named: what the service serves (its policy, or the default strategy)


async def rank_queries(
    client: httpx.AsyncClient, queries: dict[str, str], strategy: str, concurrency: int,
    progress: tqdm | None = None, failures: dict[str, str] | None = None, every_action: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each query's `/api/v1/rank` response under `strategy` (`SERVED`: the request names none),
    with every policy action's ranking too when `every_action`.

    A query that fails raises, unless `failures` is given: then it is noted there (query id:
    what failed) and left out, and the others go on.
    """
    semaphore = asyncio.Semaphore(concurrency)
    responses: dict[str, dict[str, Any]] = {}
    body: dict[str, Any] = {"depth": DEPTH} if strategy == SERVED else {"strategy": strategy, "depth": DEPTH}
    if every_action:
        body["every_action"] = True

    async def rank(query_id: str, text: str) -> None:
        try:
            async with semaphore:
                response = await client.post("/api/v1/rank", json={"q": text, **body})
            if response.status_code != 200:
                raise RuntimeError(f"query {query_id} ({strategy}): HTTP {response.status_code} {response.text}")
            responses[query_id] = response.json()
        except (RuntimeError, httpx.HTTPError) as error:
            if failures is None:
                raise
            failures[query_id] = f"{type(error).__name__}: {error}"
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(rank(qid, text) for qid, text in queries.items()))
    return responses


def doc_ids(response: dict[str, Any]) -> list[str]:
    return [entry["doc_id"] for entry in response["ranking"]]


async def _rank_all(
    client: httpx.AsyncClient, queries: dict[str, str], strategy: str, concurrency: int
) -> dict[str, list[str]]:
    with tqdm(total=len(queries), desc=f"eval {strategy}", unit="q") as progress:
        responses = await rank_queries(client, queries, strategy, concurrency, progress)
    return {qid: doc_ids(response) for qid, response in responses.items()}


def score(strategy: str, rankings: dict[str, list[str]], qrels: dict[str, dict[str, float]]) -> StrategyResult:
    per_query = {
        qid: {
            "ndcg@10": ndcg_at_k(rankings[qid], qrels[qid], 10),
            "p@5": precision_at_k(rankings[qid], qrels[qid], 5),
            "r@100": recall_at_k(rankings[qid], qrels[qid], 100),
        }
        for qid in rankings
    }

    def mean(metric: str) -> float:
        return statistics.fmean(q[metric] for q in per_query.values()) if per_query else 0.0

    return StrategyResult(strategy, len(per_query), mean("ndcg@10"), mean("p@5"), mean("r@100"), per_query)


def judged_queries(dataset: Path) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The dataset's test queries that have judgements, and the judgements."""
    qrels = load_qrels(dataset / "qrels" / "test.tsv")
    queries = {qid: text for qid, text in load_queries(dataset).items() if qid in qrels}
    if not queries:
        raise ValueError(f"{dataset}: no query in queries.jsonl has judgements in qrels/test.tsv")
    return queries, qrels


def evaluate_dataset(
    dataset: Path,
    url: str,
    api_key: str,
    strategies: Sequence[str],
    *,
    concurrency: int = 4,
    json_path: Path | None = None,
) -> list[StrategyResult]:
    """Score each strategy on the dataset's judged test queries."""
    queries, qrels = judged_queries(dataset)

    async def run() -> list[StrategyResult]:
        async with httpx.AsyncClient(
            base_url=url, headers={"X-API-Key": api_key}, timeout=60
        ) as client:
            return [
                score(s, await _rank_all(client, queries, s, concurrency), qrels) for s in strategies
            ]

    results = asyncio.run(run())
    if json_path:
        json_path.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return results


def _ndcg(result: StrategyResult, queries: list[str]) -> np.ndarray:
    return np.array([result.per_query[q]["ndcg@10"] for q in queries])


def format_table(results: Sequence[StrategyResult]) -> str:
    """The metrics, nDCG@10's 95% bootstrap interval, and each strategy paired against the best."""
    best = max(results, key=lambda r: r.ndcg_at_10)
    queries = sorted(best.per_query)
    lines = [
        f"| strategy | queries | nDCG@10 [95% interval] | P@5 | R@100 | - {best.strategy} [95% paired] | queries needed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        interval = paired_bootstrap(_ndcg(r, queries), queries)
        differences = _ndcg(r, queries) - _ndcg(best, queries)
        gap = paired_bootstrap(differences, queries)
        needed = "" if r is best else f"{queries_needed(differences):.0f}"
        lines.append(f"| {r.strategy} | {r.queries} | {r.ndcg_at_10:.4f} [{interval.low:.4f}, {interval.high:.4f}] | "
                     f"{r.p_at_5:.4f} | {r.r_at_100:.4f} | {'' if r is best else gap} | {needed} |")
    return "\n".join(lines)
