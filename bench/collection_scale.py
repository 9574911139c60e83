"""Lexical and dense latency against collection size: does a search cost grow gently?

Builds collections of about 10k, 100k and 1M documents in a scratch database of an embedded
PostgreSQL of its own, by expanding a real BEIR collection (`--dataset`), and times the
service's own retrieval (`serve_app.retrieval.DocumentIndex`) over the dataset's real queries
at each size: exhaustive BM25, bounded BM25 (impact-ordered postings, the configured cutoff per
term), and HNSW kNN up to `--dense-up-to` documents.

How documents are made: synthetic document i takes a real document A (uniformly at random) and
keeps each of A's sentences with probability 1/2, putting a sentence of another random real
document B in its place otherwise (B's sentences in order, cycled). Lengths follow the real
length distribution (each document is as long as A, in sentences), the words are the real
ones in their real proportions (so the vocabulary stays Zipfian and a query term's document
frequency grows with the collection as it would for more documents of the same kind), and
half of each document is one real document's text, keeping some of its term burstiness. The
vocabulary does not grow with size (no Heaps' law), which makes each query term's postings
list grow in full proportion to the collection: the hard case for exhaustive BM25.
Vectors are random unit vectors (documents and queries), not embeddings: no model runs, and a
graph over vectors without cluster structure is the hard case for HNSW.

Loading goes through COPY and the ingestion's own postings SQL (`cluster.data.ingest.add_postings`),
with the postings' and documents' secondary indexes dropped during the load and rebuilt after
it (as a bulk load would), then the BM25 statistics are refreshed and the tables vacuumed.

    .venv/bin/python bench/collection_scale.py --dataset PATH/TO/scifact
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import re
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg
import numpy as np
from tqdm import tqdm

from _harness import BENCH, relative, replace_section, scratch_database, unit_vectors
from cluster.data.beir import load_queries
from cluster.data.corpus import Document, read_documents
from cluster.data.ingest import Bm25Shape, add_postings, refresh_statistics
from cluster.platform.database import create_pool
from cluster.platform.embedded import owned_embedded
from cluster.platform.settings import Settings, load_settings
from serve_app.retrieval import DocumentIndex

SECTION = "## Collection size: lexical and dense latency"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="BEIR folder (corpus + queries.jsonl)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dense-up-to", type=int, default=100_000,
                        help="build HNSW and time kNN only up to this many documents")
    parser.add_argument("--queries", type=int, default=300, help="real queries timed at each size")
    parser.add_argument("--warmup", type=int, default=20, help="queries run untimed first at each size")
    parser.add_argument("--chunk", type=int, default=20_000, help="documents per COPY transaction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/dtrag-collection-scale"),
                        help="the embedded server's folder (its own: the benchmark stops it after)")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "collection_scale.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


# --- the collection ---------------------------------------------------------------------------


def real_documents(dataset: Path) -> list[list[str]]:
    """Each well-formed document of the collection as its title and its sentences."""
    documents = []
    for item in read_documents(dataset):
        if isinstance(item, Document):
            sentences = [s for s in _SENTENCE_END.split(item.text) if s]
            documents.append([item.title, *sentences] if sentences else [item.title, item.title])
    return documents


def synthetic_documents(real: list[list[str]], start: int, count: int, seed: int) -> Iterator[Document]:
    """Documents `start`..`start + count - 1`: each real document A's sentences, half of them
    swapped for those of another real document B (see the module docstring)."""
    rng = random.Random(seed * 1_000_003 + start)
    for i in range(start, start + count):
        a, b = rng.choice(real), rng.choice(real)
        b_sentences = b[1:]
        text = " ".join(s if rng.random() < 0.5 else b_sentences[j % len(b_sentences)]
                        for j, s in enumerate(a[1:]))
        yield Document(f"s{i:08d}", a[0], text)


# --- loading ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Deferred:
    """Definitions of the constraints and indexes dropped for a bulk load, in rebuild order."""
    constraints: list[tuple[str, str, str]]  # (table, name, definition): keys before foreign keys
    indexes: list[str]  # CREATE INDEX statements


async def drop_for_load(connection: asyncpg.Connection) -> Deferred:
    """Drop the postings' constraints and the secondary indexes of documents and postings.

    The documents' primary key stays: other tables reference it, and the postings SQL looks ids up.
    """
    constraints = [tuple(row) for row in await connection.fetch("""
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = 'postings'::regclass AND contype IN ('p', 'u', 'f')
        ORDER BY contype = 'f', conname""")]
    indexes = await connection.fetch("""
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
        FROM pg_index i
        WHERE i.indrelid IN ('documents'::regclass, 'postings'::regclass)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)""")
    for table, name, _ in reversed(constraints):
        await connection.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for row in indexes:
        await connection.execute(f'DROP INDEX "{row["name"]}"')
    return Deferred(constraints, [row["definition"] for row in indexes])


async def rebuild(connection: asyncpg.Connection, deferred: Deferred, with_hnsw: bool) -> list[str]:
    """Recreate what `drop_for_load` dropped (HNSW only `with_hnsw`); returns what was left out."""
    statements = [f"ALTER TABLE {table} ADD CONSTRAINT \"{name}\" {definition}"
                  for table, name, definition in deferred.constraints]
    skipped = [d for d in deferred.indexes if not with_hnsw and "USING hnsw" in d]
    statements += [d for d in deferred.indexes if d not in skipped]
    for statement in tqdm(statements, desc="rebuild indexes", unit="index"):
        await connection.execute(statement)
    return skipped


async def load(pool: asyncpg.Pool, real: list[list[str]], start: int, stop: int, chunk: int,
               bm25: Bm25Shape, seed: int) -> None:
    """Write documents `start`..`stop - 1` and their postings, `chunk` per transaction."""
    rng = np.random.default_rng(seed + start)
    async with pool.acquire() as connection:
        with tqdm(total=stop - start, desc=f"load to {stop:,}", unit="doc") as progress:
            for first in range(start, stop, chunk):
                count = min(chunk, stop - first)
                documents = list(synthetic_documents(real, first, count, seed))
                vectors = unit_vectors(count, rng)
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "documents", columns=["id", "title", "text", "content_sha256", "embedding"],
                        records=[(d.id, d.title, d.text, d.content_sha256, v)
                                 for d, v in zip(documents, vectors, strict=True)])
                    await add_postings(connection, [d.id for d in documents], bm25)
                progress.update(count)


@dataclasses.dataclass
class Build:
    documents: int
    postings: int
    seconds: float
    postings_bytes: int
    database_bytes: int
    hnsw: bool


async def grow(pool: asyncpg.Pool, real: list[list[str]], start: int, stop: int, args: argparse.Namespace,
               bm25: Bm25Shape) -> Build:
    """Add documents up to `stop`, rebuild the indexes, refresh the statistics, vacuum."""
    started = time.perf_counter()
    with_hnsw = stop <= args.dense_up_to
    async with pool.acquire() as connection:
        await connection.execute("SET maintenance_work_mem = '1GB'")
        deferred = await drop_for_load(connection)
    await load(pool, real, start, stop, args.chunk, bm25, args.seed)
    async with pool.acquire() as connection:
        await connection.execute("SET maintenance_work_mem = '1GB'")
        await rebuild(connection, deferred, with_hnsw)
        await connection.execute("UPDATE statistics_state SET dirty = true")
        print("refreshing the BM25 statistics and vacuuming ...", flush=True)
        await refresh_statistics(connection, bm25)
        await connection.execute("VACUUM ANALYZE documents")
        await connection.execute("VACUUM ANALYZE postings")
        postings, postings_bytes, database_bytes = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM postings), pg_total_relation_size('postings'),"
            " pg_database_size(current_database())")
    return Build(stop, postings, time.perf_counter() - started, postings_bytes, database_bytes, with_hnsw)


# --- timing -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    method: str
    documents: int
    p50_ms: float
    p95_ms: float


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How the bounded top 10 agrees with the exhaustive one, averaged over queries."""

    overlap: float  # share of the same documents
    tied: float  # share scoring at least the exhaustive 10th (exactly): as good, ties included


def agreement(bounded: list[tuple[str, float]], exhaustive: list[tuple[str, float]]) -> tuple[float, float]:
    """One query's overlap of the two top 10s, and the share of the bounded top 10 scoring at
    least the exhaustive 10th. Both rankings carry exact BM25 (the bounded one rescores the
    documents a cut list may under-count)."""
    top = exhaustive[:10]
    if not top:
        return 1.0, 1.0
    tenth = top[-1][1]
    as_good = sum(1 for _, score in bounded[:10] if score >= tenth - 1e-9 * abs(tenth))
    return len({doc for doc, _ in bounded[:10]} & {doc for doc, _ in top}) / len(top), as_good / len(top)


async def measure(pool: asyncpg.Pool, settings: Settings, queries: list[str], documents: int,
                  with_dense: bool, args: argparse.Namespace) -> tuple[list[Timing], Agreement]:
    """p50 and p95 of each method over the queries (interleaved, so all see the same machine),
    and how the bounded top 10 agrees with the exhaustive one."""
    retrieval = settings.retrieval
    exhaustive = dataclasses.replace(retrieval, lexical_postings_per_term=0)
    methods = {"lexical exhaustive": DocumentIndex.configured(pool, exhaustive),
               f"lexical as served (cutoff {retrieval.lexical_postings_per_term})": DocumentIndex.configured(pool, retrieval)}
    k = retrieval.candidates
    vectors = unit_vectors(len(queries), np.random.default_rng(args.seed + 1))
    times: dict[str, list[float]] = {name: [] for name in methods}
    if with_dense:
        times["dense (HNSW)"] = []
    agreements: list[tuple[float, float]] = []
    for i, (query, vector) in enumerate(tqdm(list(zip(queries, vectors, strict=True)),
                                             desc=f"time {documents:,}", unit="query")):
        rankings = []
        for name, index in methods.items():
            started = time.perf_counter()
            ranking, _ = await index.lexical_with_idf(query, k)
            times[name].append((time.perf_counter() - started) * 1000)
            rankings.append(ranking)
        exhaustive, bounded = rankings
        agreements.append(agreement(bounded, exhaustive))
        if with_dense:
            index = methods["lexical exhaustive"]
            started = time.perf_counter()
            await index.dense(vector, k)
            times["dense (HNSW)"].append((time.perf_counter() - started) * 1000)
        if i + 1 == args.warmup:  # the first queries only warm the caches
            times = {name: [] for name in times}
            agreements = []
    timings = [Timing(name, documents, percentile(values, 50), percentile(values, 95))
               for name, values in times.items()]
    overlap, tied = (statistics.fmean(values) for values in zip(*agreements))
    return timings, Agreement(overlap, tied)


# --- reporting --------------------------------------------------------------------------------


def ratios(timings: list[Timing], small: int, large: int) -> dict[str, float]:
    """p95 at `large` documents over p95 at `small`, per method measured at both."""
    p95 = {(t.method, t.documents): t.p95_ms for t in timings}
    return {method: p95[(method, large)] / p95[(method, small)]
            for method, size in p95 if size == small and (method, large) in p95}


def plot(timings: list[Timing], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(t.method for t in timings):
        rows = sorted((t for t in timings if t.method == method), key=lambda t: t.documents)
        sizes = [t.documents for t in rows]
        line, = axis.plot(sizes, [t.p95_ms for t in rows], marker="o", label=f"{method} p95")
        axis.plot(sizes, [t.p50_ms for t in rows], marker=".", linestyle="--", color=line.get_color(),
                  label=f"{method} p50")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("documents")
    axis.set_ylabel("latency per query (ms)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(timings: list[Timing]) -> str:
    lines = ["| documents | method | p50 ms | p95 ms |", "|---:|---|---:|---:|"]
    lines += [f"| {t.documents:,} | {t.method} | {t.p50_ms:.1f} | {t.p95_ms:.1f} |"
              for t in sorted(timings, key=lambda t: (t.documents, t.method))]
    return "\n".join(lines)


def build_table(builds: list[Build]) -> str:
    lines = ["| documents | postings | build s (this step) | postings table + indexes | database | HNSW |",
             "|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {b.documents:,} | {b.postings:,} | {b.seconds:.0f} | {b.postings_bytes / 2**30:.2f} GiB "
              f"| {b.database_bytes / 2**30:.2f} GiB | {'yes' if b.hnsw else 'no'} |" for b in builds]
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------


def estimate_next(builds: list[Build], target: int, free_bytes: int) -> str | None:
    """Why growing to `target` documents should not be tried here, if it should not."""
    last = builds[-1]
    factor = target / last.documents
    disk = last.database_bytes * factor
    if disk > 0.7 * free_bytes:
        return (f"{target:,} documents need about {disk / 2**30:.0f} GiB by linear extrapolation from "
                f"{last.documents:,}, more than 70% of the {free_bytes / 2**30:.0f} GiB free")
    return None


async def run(args: argparse.Namespace, url: str, settings: Settings) -> tuple[list[Build], list[Timing], dict[int, Agreement], list[str]]:
    real = real_documents(args.dataset)
    queries = list(load_queries(args.dataset).values())[: args.queries + args.warmup]
    bm25 = Bm25Shape.of(settings.retrieval)
    print(f"{len(real):,} real documents, {len(queries):,} queries; sizes {args.sizes}", flush=True)
    builds: list[Build] = []
    timings: list[Timing] = []
    agreements: dict[int, Agreement] = {}
    notes: list[str] = []
    pool = await create_pool(url, dataclasses.replace(settings.database, command_timeout_s=3600))
    try:
        for size in sorted(args.sizes):
            if builds and (reason := estimate_next(builds, size, shutil.disk_usage(args.state_dir).free)):
                notes.append(f"not built: {reason}")
                print(notes[-1], flush=True)
                break
            build = await grow(pool, real, builds[-1].documents if builds else 0, size, args, bm25)
            builds.append(build)
            print(f"{size:,} documents: {build.postings:,} postings, built in {build.seconds:.0f} s, "
                  f"database {build.database_bytes / 2**30:.2f} GiB", flush=True)
            measured, agreements[size] = await measure(pool, settings, queries, size, build.hnsw, args)
            timings += measured
            for t in measured:
                print(f"  {t.method:28s} p50 {t.p50_ms:8.1f} ms  p95 {t.p95_ms:8.1f} ms", flush=True)
            print(f"  bounded vs exhaustive top 10: overlap {agreements[size].overlap:.3f}, scoring at least "
                  f"the exhaustive 10th {agreements[size].tied:.3f}", flush=True)
    finally:
        await pool.close()
    return builds, timings, agreements, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    with owned_embedded(args.state_dir, "collection-scale benchmark") as server, \
            scratch_database(server, "scale") as url:
        builds, timings, agreements, notes = asyncio.run(run(args, url, settings))
    small = min(args.sizes)
    lines = []
    for large in sorted(args.sizes)[1:]:
        for method, ratio in ratios(timings, small, large).items():
            lines.append(f"p95({large:,}) / p95({small:,}), {method}: {ratio:.2f}x")
    print("\n".join(lines))
    title = f"{args.dataset.name} expanded: retrieval latency against collection size"
    plot(timings, args.plot, title)
    cutoff = settings.retrieval.lexical_postings_per_term
    body = f"""Command: `.venv/bin/python bench/collection_scale.py --dataset PATH/TO/{args.dataset.name} \
--sizes {' '.join(map(str, args.sizes))} --queries {args.queries} --warmup {args.warmup}` \
({time.perf_counter() - started:.0f} s; load average
{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; 2 cores). Collections made by
expanding {args.dataset.name} (each synthetic document: a real document with half its sentences swapped for
those of another, so lengths, words and their Zipfian frequencies are the real ones; the vocabulary does not
grow, so postings lists grow in full proportion: the hard case), random unit vectors instead of embeddings
(documents and queries). {args.queries} real queries of the dataset timed at each size after
{args.warmup} untimed, k = {settings.retrieval.candidates} (`retrieval.candidates`), one at a time, through
`DocumentIndex`. "As served" is the service's lexical search: bounded BM25, at most
{cutoff} postings per query term (`retrieval.lexical_postings_per_term`), the highest-impact first,
the chosen documents scored exactly.

{table(timings)}

{chr(10).join(f"- {line}" for line in lines)}
- As served vs exhaustive top 10, the same documents: {", ".join(f"{agreements[s].overlap:.3f} at {s:,}" for s in sorted(agreements))}
- As served top 10 scoring at least the exhaustive 10th (exact BM25; ties count as agreement, since
  an expanded collection holds many near-copies): {", ".join(f"{agreements[s].tied:.3f} at {s:,}" for s in sorted(agreements))}
{chr(10).join(f"- {note}" for note in notes)}

Builds (each step adds documents to the previous collection, then rebuilds every index):

{build_table(builds)}

![latency against collection size]({os.path.relpath(args.plot.resolve(), BENCH)})
"""
    replace_section(args.results, SECTION, body)
    print(f"wrote {relative(args.plot)} and the section '{SECTION}' of {relative(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
