"""Ingestion: read a collection, embed what is new or changed, upsert it with COPY.

Each chunk is one transaction: staged with COPY, upserted by id, its postings rebuilt from the
stored tsvector. Documents whose title and text are unchanged (same SHA-256) are neither
re-embedded nor rewritten, so a re-run changes nothing and costs only the read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import asyncpg
import numpy as np
from tqdm import tqdm

from cluster.data.corpus import Document, LineError, corpus_file, count_lines, read_documents

log = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass
class IngestReport:
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[LineError] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

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

_POSTINGS = """
INSERT INTO postings (lexeme, doc_id, tf, doc_len)
SELECT u.lexeme, d.id, coalesce(array_length(u.positions, 1), 1), d.doc_len
FROM documents d, unnest(d.tsv) u
WHERE d.id = ANY($1::text[])"""


async def _write_chunk(
    connection: asyncpg.Connection, documents: Sequence[Document], embed: Embed
) -> tuple[int, int, int]:
    """Upsert one chunk atomically; returns (inserted, updated, unchanged)."""
    ids = [d.id for d in documents]
    stored = dict(
        await connection.fetch(
            "SELECT id, content_sha256 FROM documents WHERE id = ANY($1::text[])", ids
        )
    )
    changed = [d for d in documents if stored.get(d.id) != d.content_sha256]
    if not changed:
        return 0, 0, len(documents)
    vectors = embed([embedding_input(d) for d in changed])
    changed_ids = [d.id for d in changed]
    async with connection.transaction():
        await connection.execute(_STAGE)
        await connection.copy_records_to_table(
            "staged_documents",
            records=[
                (d.id, d.title, d.text, d.content_sha256, vector)
                for d, vector in zip(changed, vectors, strict=True)
            ],
        )
        results = await connection.fetch(_UPSERT)
        await connection.execute(_DOC_LENGTHS, changed_ids)
        await connection.execute("DELETE FROM postings WHERE doc_id = ANY($1::text[])", changed_ids)
        await connection.execute(_POSTINGS, changed_ids)
    inserted = sum(1 for row in results if row["inserted"])
    return inserted, len(changed) - inserted, len(documents) - len(changed)


async def refresh_statistics(connection: asyncpg.Connection) -> None:
    """Recompute document frequencies and average length for BM25, without blocking readers."""
    await connection.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY lexeme_stats")
    await connection.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY corpus_stats")


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
) -> IngestReport:
    """Load the collection at `path` into the documents table; malformed lines are reported."""
    source = corpus_file(path)
    report = IngestReport()
    started = time.perf_counter()
    with tqdm(total=count_lines(source), unit="doc", desc=f"ingest {source.name}",
              disable=not show_progress) as progress:
        async with pool.acquire() as connection:
            for chunk in _chunks(read_documents(source), chunk_size, report, progress):
                inserted, updated, unchanged = await _write_chunk(connection, chunk, embed)
                report.read += len(chunk)
                report.inserted += inserted
                report.updated += updated
                report.unchanged += unchanged
            if report.inserted or report.updated:
                await refresh_statistics(connection)
    report.seconds = time.perf_counter() - started
    log.info("ingested", extra={"source": str(source), **{
        k: v for k, v in dataclasses.asdict(report).items() if k != "errors"},
        "errors": len(report.errors)})
    return report


async def document_count(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM documents")

