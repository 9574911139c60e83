"""Does bounded BM25 rank like exhaustive BM25, and what does a posting cost in each? nDCG@10 of
both on a real collection's judged queries, and each plan's time against the postings it reads.

Loads the collection (`--dataset`, a BEIR folder) with the real ingestion into a scratch database
of an embedded PostgreSQL of its own (random unit vectors stand in for embeddings: only BM25 is
scored), then ranks every judged test query with exhaustive BM25 and with bounded BM25 at each
`--cutoffs` value (postings read per query term), and reports nDCG@10, the per-query difference
with its paired bootstrap 95% interval, how often the bounded top k is proven exact, and how
often it equals the exhaustive top 10.

Then it times both plans on every query at the service's cutoff (the best of 3 interleaved runs
each), fits time = fixed + per-posting cost x postings for each, and reports the ratio of the two
per-posting costs and how often the bounded plan, which the service always runs, is the faster.

    .venv/bin/python bench/bounded_lexical_quality.py --dataset PATH/TO/scifact
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import numpy as np

from _harness import BENCH, relative, replace_section, scratch_database, unit_vectors
from cluster.clients.evaluate import judged_queries
from cluster.data.ingest import ingest
from cluster.platform.database import create_pool
from cluster.platform.embedded import owned_embedded
from cluster.platform.settings import Settings, load_settings
from learners.policy_scores import Interval, paired_bootstrap
from learners.ranking_metrics import ndcg_at_k
from serve_app.retrieval import DocumentIndex

SECTION = "## Bounded BM25: nDCG@10 against exhaustive"
TIMING_RUNS = 3  # per plan and query; the best is kept
# Postings the exhaustive plan aggregates for query $1, and the most the bounded one reads at cutoff $2.
POSTINGS_READ = """
SELECT coalesce(sum(l.df), 0) AS exhaustive, coalesce(sum(least(l.df, $2)), 0) AS bounded
FROM unnest(to_tsvector('english', $1)) u JOIN lexeme_stats l ON l.lexeme = u.lexeme"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, action="append", required=True,
                        help="BEIR folder with queries.jsonl and qrels/test.tsv (repeatable)")
    parser.add_argument("--cutoffs", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/dtrag-bounded-quality"),
                        help="the embedded server's folder (its own: the benchmark stops it after)")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Row:
    dataset: str
    cutoff: int
    ndcg_exhaustive: float
    ndcg_bounded: float
    difference: Interval
    proven_exact: float  # share of queries whose bounded top k is proven exact
    same_top10: float  # share of queries whose bounded top 10 equals the exhaustive one


@dataclasses.dataclass
class PlanCosts:
    """Each query's postings and best time under both plans, at the service's cutoff."""

    dataset: str
    exhaustive_postings: np.ndarray  # (queries,)
    bounded_postings: np.ndarray  # (queries,), at most cutoff per term
    exhaustive_ms: np.ndarray  # (queries,)
    bounded_ms: np.ndarray  # (queries,)

    def summary(self) -> str:
        e_fixed, e_slope = line_fit(self.exhaustive_postings, self.exhaustive_ms)
        b_fixed, b_slope = line_fit(self.bounded_postings, self.bounded_ms)
        return (f"| {self.dataset} | {len(self.bounded_ms)} | {e_fixed:.2f} + {1000 * e_slope:.2f} us/posting "
                f"| {b_fixed:.2f} + {1000 * b_slope:.2f} us/posting | {b_slope / e_slope:.2f} "
                f"| {(self.bounded_postings < self.exhaustive_postings).mean():.1%} "
                f"| {(self.bounded_ms < self.exhaustive_ms).mean():.1%} "
                f"| {self.bounded_ms.sum() / self.exhaustive_ms.sum():.2f} |")


def line_fit(postings: np.ndarray, ms: np.ndarray) -> tuple[float, float]:
    """(fixed ms, ms per posting) of ms = fixed + per_posting x postings, least squares."""
    per_posting, fixed = np.polyfit(postings.astype(float), ms, 1)
    return float(fixed), float(per_posting)


async def best_ms(run: Callable[[], Awaitable[object]]) -> float:
    """The best of TIMING_RUNS runs, in ms."""
    times = []
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        await run()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


async def plan_costs(name: str, pool: asyncpg.Pool, exhaustive: DocumentIndex, bounded: DocumentIndex,
                     cutoff: int, texts: Sequence[str], k: int) -> PlanCosts:
    postings = [await pool.fetchrow(POSTINGS_READ, text, cutoff) for text in texts]
    exhaustive_ms, bounded_ms = [], []
    for text in texts:
        exhaustive_ms.append(await best_ms(lambda: exhaustive.lexical_with_idf(text, k)))
        bounded_ms.append(await best_ms(lambda: bounded.lexical_bounded(text, k)))
    return PlanCosts(name, np.array([row["exhaustive"] for row in postings]),
                     np.array([row["bounded"] for row in postings]), np.array(exhaustive_ms), np.array(bounded_ms))


def random_vectors(texts: Sequence[str]) -> np.ndarray:
    """The ingestion's `embed`, with random unit vectors: only BM25 is scored here."""
    return unit_vectors(len(texts), np.random.default_rng(len(texts)))


async def evaluate(url: str, settings: Settings, dataset: Path, cutoffs: Sequence[int]) -> tuple[list[Row], PlanCosts]:
    queries, qrels = judged_queries(dataset)
    retrieval = settings.retrieval
    k = retrieval.candidates
    pool = await create_pool(url, dataclasses.replace(settings.database, command_timeout_s=600))
    try:
        await ingest(pool, dataset, random_vectors)
        exhaustive = DocumentIndex.configured(pool, dataclasses.replace(retrieval, lexical_postings_per_term=0))
        reference = {qid: [d for d, _ in (await exhaustive.lexical_with_idf(text, k))[0]]
                     for qid, text in queries.items()}
        base = np.array([ndcg_at_k(reference[qid][:10], qrels[qid], 10) for qid in queries])
        rows = []
        for cutoff in cutoffs:
            bounded = DocumentIndex.configured(pool, dataclasses.replace(retrieval, lexical_postings_per_term=cutoff))
            results = {qid: await bounded.lexical_bounded(text, k) for qid, text in queries.items()}
            ranked = {qid: [d for d, _ in result.ranking] for qid, result in results.items()}
            scores = np.array([ndcg_at_k(ranked[qid][:10], qrels[qid], 10) for qid in queries])
            rows.append(Row(
                dataset.name, cutoff, float(base.mean()), float(scores.mean()), paired_bootstrap(scores - base),
                float(np.mean([r.exact for r in results.values()])),
                float(np.mean([ranked[qid][:10] == reference[qid][:10] for qid in queries]))))
            print(f"{dataset.name} cutoff {cutoff}: nDCG@10 {rows[-1].ndcg_bounded:.4f} vs exhaustive "
                  f"{rows[-1].ndcg_exhaustive:.4f}, difference {rows[-1].difference}, proven exact "
                  f"{rows[-1].proven_exact:.1%}, same top 10 {rows[-1].same_top10:.1%}", flush=True)
        served = DocumentIndex.configured(pool, retrieval)
        costs = await plan_costs(dataset.name, pool, exhaustive, served, retrieval.lexical_postings_per_term,
                                 list(queries.values()), k)
        print(costs.summary(), flush=True)
        return rows, costs
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    started = time.perf_counter()
    rows: list[Row] = []
    costs: list[PlanCosts] = []
    with owned_embedded(args.state_dir, "bounded-lexical quality benchmark") as server:
        for dataset in args.dataset:
            with scratch_database(server, "quality") as url:
                dataset_rows, dataset_costs = asyncio.run(evaluate(url, settings, dataset, args.cutoffs))
                rows += dataset_rows
                costs.append(dataset_costs)
    table = ["| collection | postings per term | nDCG@10 exhaustive | nDCG@10 bounded | bounded - exhaustive "
             "[95% paired bootstrap] | top k proven exact | same top 10 |", "|---|---:|---:|---:|---|---:|---:|"]
    table += [f"| {r.dataset} | {r.cutoff} | {r.ndcg_exhaustive:.4f} | {r.ndcg_bounded:.4f} | {r.difference} "
              f"| {r.proven_exact:.1%} | {r.same_top10:.1%} |" for r in rows]
    command = " ".join(f"--dataset PATH/TO/{d.name}" for d in args.dataset)
    body = f"""Command: `.venv/bin/python bench/bounded_lexical_quality.py {command} --cutoffs \
{' '.join(map(str, args.cutoffs))}` ({time.perf_counter() - started:.0f} s). Each collection loaded with
the real ingestion; BM25-only rankings of the judged test queries, k = {settings.retrieval.candidates},
k1 = {settings.retrieval.bm25_k1}, b = {settings.retrieval.bm25_b}; the service's cutoff is
`retrieval.lexical_postings_per_term` = {settings.retrieval.lexical_postings_per_term}.

{chr(10).join(table)}

What a posting costs in each plan, at the service's cutoff ({settings.retrieval.lexical_postings_per_term}): each
judged query timed {TIMING_RUNS} times per plan, interleaved, the best kept; a line fitted to each plan's
times against the postings it reads. The service runs the bounded plan whenever the cutoff is
above 0: it is the faster one even where it cuts no list.

| collection | queries | exhaustive: fixed ms + per posting | bounded: fixed ms + per posting | bounded / exhaustive per posting | queries with a list cut | bounded faster | total time bounded / exhaustive |
|---|---:|---|---|---:|---:|---:|---:|
{chr(10).join(c.summary() for c in costs)}
"""
    replace_section(args.results, SECTION, body)
    print(f"wrote the section '{SECTION}' of {relative(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
