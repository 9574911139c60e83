"""Does bounded BM25 rank like exhaustive BM25? nDCG@10 of both on a real collection's judged queries.

Loads the collection (`--dataset`, a BEIR folder) with the real ingestion into a scratch database
of an embedded PostgreSQL of its own (random unit vectors stand in for embeddings: only BM25 is
scored), then ranks every judged test query with exhaustive BM25 and with bounded BM25 at each
`--cutoffs` value (postings read per query term), and reports nDCG@10, the per-query difference
with its paired bootstrap 95% interval, how often the bounded top k is proven exact, and how
often it equals the exhaustive top 10.

    .venv/bin/python bench/bounded_lexical_quality.py --dataset PATH/TO/scifact
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from _harness import BENCH, relative, replace_section, scratch_database
from cluster.clients.evaluate import judged_queries
from cluster.data.ingest import ingest
from cluster.platform.database import create_pool
from cluster.platform.embedded import owned_embedded
from cluster.platform.settings import Settings, load_settings
from learners.policy_scores import Interval, paired_bootstrap
from learners.ranking_metrics import ndcg_at_k
from serve_app.retrieval import DocumentIndex

SECTION = "## Bounded BM25: nDCG@10 against exhaustive"


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


def random_vectors(texts: Sequence[str]) -> np.ndarray:
    vectors = np.random.default_rng(len(texts)).standard_normal((len(texts), 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def evaluate(url: str, settings: Settings, dataset: Path, cutoffs: Sequence[int]) -> list[Row]:
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
        return rows
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    started = time.perf_counter()
    rows: list[Row] = []
    with owned_embedded(args.state_dir, "bounded-lexical quality benchmark") as server:
        for dataset in args.dataset:
            with scratch_database(server, "quality") as url:
                rows += asyncio.run(evaluate(url, settings, dataset, args.cutoffs))
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
"""
    replace_section(args.results, SECTION, body)
    print(f"wrote the section '{SECTION}' of {relative(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
