"""Evaluate every strategy on a BEIR-layout dataset, in shards fanned out over Ray tasks.

    python -m cluster.jobs.evaluate cluster/data/sample_corpus --workers 2
    dtrag jobs submit evaluate cluster/data/sample_corpus --workers 2

It searches through the running service's HTTP API (`/api/v1/rank`, depth 100), as `dtrag eval`
does, so it measures what is deployed (index, settings, flags, replicas) and gives the same
numbers. The tasks are HTTP clients: they reserve no CPU (the service does the work, and a Serve
application may hold every CPU of a small cluster); `--workers` is how many run at once, each
with `--concurrency` requests in flight.

Scored under each fixed strategy (`--strategy`, default all), each retrieval action of the
policy (`lexical`, `hybrid@W`, `hybrid@W+prf` of the configured fusion grid, all ranked by one
request per query; `--no-actions` skips them), and with `--policy served` what the service
serves when a request names no strategy (its learned policy when the arm's `soft_q_bandit` flag
is on, else the default strategy). Per query: nDCG@10, P@5, R@100 (`learners.ranking_metrics`);
means overall and per state (the service's state key, `learners.state_encoder`), each with a
95% bootstrap interval over queries. A query that fails is counted and left out, never fatal.

Writes into `--out` (default `STATE_DIR/jobs/evaluate-DATASET-TIME`):
    per_query.parquet   query_id, state_key, strategy, ndcg@10, p@5, r@100: one row per query and strategy
    metrics.parquet     scope (overall or a state key), strategy, metric, queries, mean, low, high
    table.md            the same as tables
    ndcg.png            nDCG@10 per strategy with its interval, and per state
The summary line gives each strategy's overall nDCG@10 and the paths.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.jobs.common import connect_ray, main, progress
from cluster.clients.evaluate import DEPTH, SERVED, doc_ids, judged_queries, rank_queries, score
from cluster.core.vocabulary import STRATEGIES
from cluster.platform.settings import Settings
from learners.policy_scores import paired_bootstrap

METRICS = ("ndcg@10", "p@5", "r@100")
OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class Shard:
    queries: dict[str, str]
    qrels: dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class ShardResult:
    rows: list[dict[str, Any]]  # query_id, state_key, strategy and METRICS
    failures: dict[str, str]  # "query id (strategy)": what failed


def shards(queries: dict[str, str], qrels: dict[str, dict[str, float]], size: int) -> list[Shard]:
    """Consecutive runs of `size` queries, in id order (the order does not change any score)."""
    ids = sorted(queries)
    return [Shard({q: queries[q] for q in ids[i:i + size]}, {q: qrels[q] for q in ids[i:i + size]})
            for i in range(0, len(ids), size)]


async def _rank_shard(shard: Shard, url: str, api_key: str, strategies: Sequence[str], actions: bool,
                      concurrency: int) -> ShardResult:
    import httpx

    rankings: dict[str, dict[str, list[str]]] = {}
    states: dict[str, str] = {}
    failures: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": api_key}, timeout=120) as client:
        for strategy in strategies:
            failed: dict[str, str] = {}
            responses = await rank_queries(client, shard.queries, strategy, concurrency, failures=failed)
            failures.update({f"{q} ({strategy})": why for q, why in failed.items()})
            rankings[strategy] = {q: doc_ids(r) for q, r in responses.items()}
            states.update({q: r["state_key"] for q, r in responses.items()})
        if actions:
            failed = {}
            responses = await rank_queries(client, shard.queries, SERVED, concurrency, failures=failed,
                                           every_action=True)
            failures.update({f"{q} (actions)": why for q, why in failed.items()})
            for query, response in responses.items():
                states.setdefault(query, response["state_key"])
                for action in response["actions"]:
                    if action["name"] not in strategies:  # `lexical` is both; ranked as a strategy already
                        rankings.setdefault(action["name"], {})[query] = action["doc_ids"][:DEPTH]
    rows = []
    for strategy, ranked in rankings.items():
        for query, values in score(strategy, ranked, shard.qrels).per_query.items():
            rows.append({"query_id": query, "state_key": states[query], "strategy": strategy, **values})
    return ShardResult(rows, failures)


def rank_shard(shard: Shard, url: str, api_key: str, strategies: Sequence[str], actions: bool,
               concurrency: int) -> ShardResult:
    """One shard's rows; the body of the Ray task."""
    return asyncio.run(_rank_shard(shard, url, api_key, strategies, actions, concurrency))


def run_shards(work: list[Shard], workers: int, **options: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every shard as a Ray task, `workers` at a time; rows and failures of all of them."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=1)(rank_shard)
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    pending: dict[Any, int] = {}
    queue = list(work)
    with progress(sum(len(s.queries) for s in work), "queries") as bar:
        while queue or pending:
            while queue and len(pending) < workers:
                shard = queue.pop(0)
                pending[task.remote(shard, **options)] = len(shard.queries)
            done, _ = ray.wait(list(pending), num_returns=1)
            result: ShardResult = ray.get(done[0])
            rows += result.rows
            failures.update(result.failures)
            bar.update(pending.pop(done[0]))
    return rows, failures


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and 95% bootstrap interval of each metric, per strategy, overall and per state."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((OVERALL, row["strategy"]), []).append(row)
        groups.setdefault((row["state_key"], row["strategy"]), []).append(row)
    out = []
    for (scope, strategy), members in groups.items():
        members.sort(key=lambda m: m["query_id"])  # as `dtrag eval` resamples: the same intervals
        queries = [m["query_id"] for m in members]
        for metric in METRICS:
            interval = paired_bootstrap([m[metric] for m in members], queries)
            out.append({"scope": scope, "strategy": strategy, "metric": metric, "queries": len(members),
                        "mean": interval.mean, "low": interval.low, "high": interval.high})
    return sorted(out, key=lambda m: (m["scope"] != OVERALL, m["scope"], m["strategy"], m["metric"]))


def format_tables(metrics: list[dict[str, Any]]) -> str:
    """Overall, then per state: each metric as `mean [low, high]`."""
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for m in metrics:
        cells.setdefault((m["scope"], m["strategy"]), {})[m["metric"]] = m
    header = ["| strategy | queries | " + " | ".join(f"{n} [95%]" for n in ("nDCG@10", "P@5", "R@100")) + " |",
              "|---|---:|---:|---:|---:|"]

    def line(key: tuple[str, str]) -> str:
        values = cells[key]
        return (f"| {key[1]} | {values['ndcg@10']['queries']} | "
                + " | ".join(f"{values[n]['mean']:.4f} [{values[n]['low']:.4f}, {values[n]['high']:.4f}]"
                             for n in METRICS) + " |")

    keys = sorted(cells, key=lambda k: -cells[k]["ndcg@10"]["mean"])
    lines = ["## Overall", "", *header, *(line(k) for k in keys if k[0] == OVERALL)]
    for state in sorted({k[0] for k in cells} - {OVERALL}):
        lines += ["", f"## State `{state}`", "", *header, *(line(k) for k in keys if k[0] == state)]
    return "\n".join(lines) + "\n"


def plot(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    """Overall nDCG@10 with intervals beside a state x strategy map of nDCG@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ndcg = [m for m in metrics if m["metric"] == "ndcg@10"]
    overall = sorted((m for m in ndcg if m["scope"] == OVERALL), key=lambda m: m["mean"])
    strategies = [m["strategy"] for m in overall]
    states = sorted({m["scope"] for m in ndcg} - {OVERALL})
    grid = np.full((len(states), len(strategies)), np.nan)
    for m in ndcg:
        if m["scope"] != OVERALL:
            grid[states.index(m["scope"]), strategies.index(m["strategy"])] = m["mean"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.35 * max(len(strategies), len(states)) + 2)),
                                         gridspec_kw={"width_ratios": [1, 1.4]})
    means = np.array([m["mean"] for m in overall])
    errors = np.array([[m["mean"] - m["low"] for m in overall], [m["high"] - m["mean"] for m in overall]])
    left.barh(strategies, means, xerr=errors, color="#4c72b0", capsize=3)
    left.set_xlabel("nDCG@10 (95% bootstrap interval)")
    left.set_title(f"overall, {overall[0]['queries'] if overall else 0} queries")
    image = right.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(grid, initial=0)))
    right.set_xticks(range(len(strategies)), strategies, rotation=60, ha="right")
    counts = {m["scope"]: m["queries"] for m in ndcg if m["scope"] != OVERALL}
    right.set_yticks(range(len(states)), [f"{s} ({counts[s]})" for s in states], fontsize=7)
    right.set_title("nDCG@10 per state (queries)")
    figure.colorbar(image, ax=right)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(rows: list[dict[str, Any]], metrics: list[dict[str, Any]], out: Path, title: str) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_query": out / "per_query.parquet", "metrics": out / "metrics.parquet",
             "table": out / "table.md", "plot": out / "ndcg.png"}
    columns = ("query_id", "state_key", "strategy", *METRICS)
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), paths["per_query"])
    pq.write_table(pa.Table.from_pylist(metrics), paths["metrics"])
    paths["table"].write_text(f"# {title}\n\n" + format_tables(metrics))
    plot(metrics, paths["plot"], title)
    return {name: str(path) for name, path in paths.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.cli.service import add_target_options

    parser.add_argument("dataset", type=Path, help="BEIR folder with queries.jsonl and qrels/test.tsv")
    parser.add_argument("--strategy", action="append", choices=STRATEGIES, help="a fixed strategy (default: all)")
    parser.add_argument("--no-actions", action="store_true", help="skip the policy's retrieval actions")
    parser.add_argument("--policy", choices=(SERVED,), help="also score what the service serves unasked")
    parser.add_argument("--workers", type=int, default=2, help="Ray tasks at once (default 2)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight per task (default 2)")
    parser.add_argument("--shard-size", type=int, default=25, help="queries per task (default 25)")
    parser.add_argument("--out", type=Path, help="output folder (default STATE_DIR/jobs/evaluate-DATASET-TIME)")
    add_target_options(parser)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from cluster.cli.service import service_target

    if min(args.workers, args.concurrency, args.shard_size) < 1:
        raise ValueError("--workers, --concurrency and --shard-size must be at least 1")
    url, api_key = service_target(args, settings)
    queries, qrels = judged_queries(args.dataset)
    strategies = [*(args.strategy or STRATEGIES), *([args.policy] if args.policy else [])]
    dataset = args.dataset.resolve().name
    out = args.out or settings.state_dir / "jobs" / f"evaluate-{dataset}-{time.strftime('%Y%m%dT%H%M%S')}"
    connect_ray(args)
    started = time.monotonic()
    rows, failures = run_shards(shards(queries, qrels, args.shard_size), args.workers, url=url, api_key=api_key,
                                strategies=strategies, actions=not args.no_actions, concurrency=args.concurrency)
    seconds = time.monotonic() - started
    for what, why in sorted(failures.items())[:10]:
        print(f"failed: {what}: {why}", file=sys.stderr)
    if not rows:
        raise ValueError(f"every query failed ({len(failures)}); is the service at {url} up?")
    metrics = aggregate(rows)
    paths = write_outputs(rows, metrics, out.resolve(), f"{dataset}: {len(queries)} queries")
    print(format_tables([m for m in metrics if m["scope"] == OVERALL]))
    ndcg = {m["strategy"]: round(m["mean"], 4) for m in metrics if m["scope"] == OVERALL and m["metric"] == "ndcg@10"}
    return {"dataset": dataset, "queries": len(queries), "failed": len(failures), "workers": args.workers,
            "seconds": round(seconds, 2), "ndcg@10": ndcg, **paths}


if __name__ == "__main__":
    sys.exit(main("evaluate", __doc__, add_arguments, run))
