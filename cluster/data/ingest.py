"""Ingestion: read a collection, embed what is new or changed, upsert it with COPY.

Each chunk is one transaction: staged with COPY, upserted by id, its postings rebuilt from the
stored tsvector. Documents whose title and text are unchanged (same SHA-256) are neither
re-embedded nor rewritten, so a re-run changes nothing and costs only the read.

A bad record is skipped and reported with its line number, never fatal. Most are refused while
reading (`cluster.data.corpus.record_problem`); should PostgreSQL still refuse a chunk for its
data, the chunk is written again one document at a time, so only the offender is skipped.

The BM25 statistics are materialized views over the whole collection, too costly to refresh
per chunk, so a flag keeps them honest: each chunk sets `statistics_state.dirty` in the
transaction that writes it, and `refresh_statistics` clears it in the transaction that
refreshes, holding the row so a chunk committing meanwhile waits and sets it again. Every run
ends by refreshing when the flag is set, whatever it wrote itself: a run interrupted after
some chunks (Ctrl-C, a crash, a lost connection) leaves the flag set, and the next run, even
one that finds every document unchanged, brings the statistics up to date.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import asyncpg
import numpy as np
from tqdm import tqdm

from cluster.core.bm25 import term_frequency_part
from cluster.data.corpus import Document, LineError, corpus_file, count_lines, read_documents
from cluster.platform.settings import RetrievalSettings, load_settings

log = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass
class IngestReport:
    read: int = 0  # well-formed documents
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[LineError] = dataclasses.field(default_factory=list)  # records skipped, with why
    statistics_refreshed: bool = False
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        """Documents now in the database as the file has them (written or already there)."""
        return self.inserted + self.updated + self.unchanged

    @property
    def skipped_by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(error.kind for error in self.errors).most_common())

    @property
    def docs_per_second(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else 0.0


def embedding_input(document: Document) -> str:
    """What the embedder sees: title and text, as in the BEIR dense baselines."""
    return f"{document.title}. {document.text}" if document.title else document.text


_STAGE = """CREATE TEMPORARY TABLE staged_documents (
    id text, title text, text text, content_sha256 text, embedding vector(384)) ON COMMIT DROP"""

_UPSERT = """
INSERT INTO documents AS d (id, title, text, content_sha256, embedding)
SELECT id, title, text, content_sha256, embedding FROM staged_documents
ON CONFLICT (id) DO UPDATE
    SET title = excluded.title, text = excluded.text, content_sha256 = excluded.content_sha256,
        embedding = excluded.embedding, ingested_at = now()
RETURNING (xmax = 0) AS inserted"""

_DOC_LENGTHS = """
UPDATE documents d SET doc_len = coalesce(
    (SELECT sum(coalesce(array_length(u.positions, 1), 1)) FROM unnest(d.tsv) u), 0)
WHERE d.id = ANY($1::text[])"""

# The impact (BM25's term-frequency part) orders postings for bounded lexical search
# (`serve_app.retrieval`); it takes the collection's average length from the statistics, or
# from the documents being written while the collection has none yet (its first ingestion).
_POSTINGS = f"""
WITH average AS (
    SELECT coalesce((SELECT avg_doc_len FROM corpus_stats WHERE n_docs > 0),
                    (SELECT avg(doc_len) FROM documents WHERE id = ANY($1::text[]))) AS doc_len
)
INSERT INTO postings (lexeme, doc_id, tf, doc_len, impact)
SELECT t.lexeme, t.doc_id, t.tf, t.doc_len, {term_frequency_part("t.tf", "t.doc_len", "a.doc_len", "$2", "$3")}
FROM (SELECT u.lexeme, d.id AS doc_id, coalesce(array_length(u.positions, 1), 1) AS tf, d.doc_len
      FROM documents d, unnest(d.tsv) u
      WHERE d.id = ANY($1::text[])) t
CROSS JOIN average a"""


# Whether the postings' impacts were computed with another BM25 shape than ($1 = k1, $2 = b) and
# the collection's average length now (more than $3 of it apart), or with one nobody recorded.
_IMPACTS_STALE = """
SELECT st.impact_k1 IS DISTINCT FROM $1 OR st.impact_b IS DISTINCT FROM $2
       OR st.impact_avg_doc_len IS NULL
       OR abs(c.avg_doc_len / greatest(st.impact_avg_doc_len, 1e-9) - 1) > $3
FROM statistics_state st CROSS JOIN corpus_stats c
WHERE c.n_docs > 0"""
_REWEIGH_IMPACTS = f"""
UPDATE postings p SET impact = {term_frequency_part("p.tf", "p.doc_len", "c.avg_doc_len", "$1", "$2")}
FROM corpus_stats c"""
_RECORD_IMPACT_SHAPE = """
UPDATE statistics_state SET impact_k1 = $1, impact_b = $2, impact_avg_doc_len = c.avg_doc_len
FROM corpus_stats c"""
# How far the average document length may move before every impact is recomputed: the ordering
# it gives drifts slowly (b = 0.4 weighs length at 40%), and a recompute rewrites every posting.
IMPACT_DRIFT = 0.1

# Unconditional, so it always takes the row's lock: a chunk ending while a refresh holds the
# row waits for it, then marks the statistics stale again.
_MARK_DIRTY = "UPDATE statistics_state SET dirty = true"

# What PostgreSQL (or asyncpg encoding a value) raises for a value it cannot store; anything
# else, a lost connection above all, is systemic and ends the run.
_REFUSED = (asyncpg.DataError, asyncpg.ProgramLimitExceededError, ValueError)


@dataclasses.dataclass(frozen=True)
class Bm25Shape:
    """The BM25 parameters the postings' impacts are computed with (`retrieval.bm25_k1`, `bm25_b`)."""
    k1: float
    b: float

    @classmethod
    def of(cls, retrieval: RetrievalSettings) -> Bm25Shape:
        return cls(retrieval.bm25_k1, retrieval.bm25_b)

    @classmethod
    def configured(cls) -> Bm25Shape:
        return cls.of(load_settings().retrieval)


async def add_postings(connection: asyncpg.Connection, ids: Sequence[str], bm25: Bm25Shape) -> None:
    """Set the length and write the postings of stored documents that have none yet."""
    await connection.execute(_DOC_LENGTHS, ids)
    await connection.execute(_POSTINGS, ids, bm25.k1, bm25.b)


async def _upsert(connection: asyncpg.Connection, documents: Sequence[Document],
                  vectors: Sequence[np.ndarray], bm25: Bm25Shape) -> int:
    """Write `documents` and their postings in one transaction; returns how many were new."""
    ids = [d.id for d in documents]
    async with connection.transaction():
        await connection.execute(_STAGE)
        await connection.copy_records_to_table(
            "staged_documents",
            records=[(d.id, d.title, d.text, d.content_sha256, vector)
                     for d, vector in zip(documents, vectors, strict=True)],
        )
        results = await connection.fetch(_UPSERT)
        await connection.execute("DELETE FROM postings WHERE doc_id = ANY($1::text[])", ids)
        await add_postings(connection, ids, bm25)
        await connection.execute(_MARK_DIRTY)
    return sum(1 for row in results if row["inserted"])


async def _write_chunk(connection: asyncpg.Connection, documents: Sequence[Document], embed: Embed,
                       report: IngestReport, bm25: Bm25Shape) -> None:
    """Upsert the chunk's new and changed documents, adding the outcome to `report`."""
    stored = dict(await connection.fetch(
        "SELECT id, content_sha256 FROM documents WHERE id = ANY($1::text[])", [d.id for d in documents]))
    changed = [d for d in documents if stored.get(d.id) != d.content_sha256]
    report.unchanged += len(documents) - len(changed)
    if not changed:
        return
    vectors = embed([embedding_input(d) for d in changed])
    try:
        written, inserted = len(changed), await _upsert(connection, changed, vectors, bm25)
    except _REFUSED:  # a value the checks while reading did not foresee: find it, keep the rest
        written = inserted = 0
        for document, vector in zip(changed, vectors, strict=True):
            try:
                inserted += await _upsert(connection, [document], [vector], bm25)
                written += 1
            except _REFUSED as error:
                report.errors.append(LineError(document.line, f"refused by PostgreSQL: {error}"))
    report.inserted += inserted
    report.updated += written - inserted


async def refresh_statistics(connection: asyncpg.Connection, bm25: Bm25Shape, *, timeout_s: float = 3600) -> bool:
    """Recompute document frequencies and average length for BM25 if any write made them stale,
    and the postings' impacts if they no longer have `bm25`'s shape (see `IMPACT_DRIFT`).

    Readers are never blocked (CONCURRENTLY); returns whether the statistics needed a refresh.
    Both scan every posting, so they get their own time limit rather than the pool's per-command one.
    """
    async with connection.transaction():
        dirty = await connection.fetchval("SELECT dirty FROM statistics_state FOR UPDATE")
        if dirty:
            await connection.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY lexeme_stats", timeout=timeout_s)
            await connection.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY corpus_stats", timeout=timeout_s)
            await connection.execute("UPDATE statistics_state SET dirty = false, refreshed_at = now()")
        if await connection.fetchval(_IMPACTS_STALE, bm25.k1, bm25.b, IMPACT_DRIFT):
            await connection.execute(_REWEIGH_IMPACTS, bm25.k1, bm25.b, timeout=timeout_s)
            await connection.execute(_RECORD_IMPACT_SHAPE, bm25.k1, bm25.b)
    return dirty


def _chunks(items: Iterable[Document | LineError], size: int, report: IngestReport,
            progress: tqdm) -> Iterable[list[Document]]:
    """Group documents into lists of `size`, recording errors as they pass."""
    chunk: list[Document] = []
    for item in items:
        progress.update(1)
        if isinstance(item, LineError):
            report.errors.append(item)
            continue
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def ingest(
    pool: asyncpg.Pool,
    path: Path,
    embed: Embed,
    *,
    chunk_size: int = 256,
    show_progress: bool = True,
    bm25: Bm25Shape | None = None,
) -> IngestReport:
    """Load the collection at `path` into the documents table; bad records are skipped and reported.

    `bm25` shapes the postings' impacts; by default the configured parameters.
    Raises only for what no record can fix: an unreadable file or an unreachable database.
    """
    bm25 = bm25 or Bm25Shape.configured()
    source = corpus_file(path)
    report = IngestReport()
    started = time.perf_counter()
    with tqdm(total=count_lines(source), unit="doc", desc=f"ingest {source.name}",
              disable=not show_progress) as progress:
        async with pool.acquire() as connection:
            for chunk in _chunks(read_documents(source), chunk_size, report, progress):
                report.read += len(chunk)
                await _write_chunk(connection, chunk, embed, report, bm25)
            report.statistics_refreshed = await refresh_statistics(connection, bm25)
    report.errors.sort(key=lambda error: error.line)  # those found by PostgreSQL came later
    report.seconds = time.perf_counter() - started
    log.info("ingested", extra={"source": str(source), **{
        k: v for k, v in dataclasses.asdict(report).items() if k != "errors"},
        "skipped": report.skipped_by_kind})
    return report


async def document_count(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM documents")

