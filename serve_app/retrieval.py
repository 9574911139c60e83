"""Candidate retrieval from PostgreSQL: BM25 over the postings table, and cosine kNN over HNSW.

Lexical ranking uses PostgreSQL's own text analysis (the `english` configuration: stemming,
stop words) for tokens, and Okapi BM25 with Lucene's idf for scores, because `ts_rank` has no
inverse document frequency and ranks noticeably worse on real collections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import asyncpg
import numpy as np

from cluster.core.bm25 import IDF, term_frequency_part
from cluster.platform.database import unavailable_on_connection_errors
from cluster.platform.settings import RetrievalSettings
from serve_app.fusion import Ranking

_QUERY_TERMS = """
WITH query_terms AS (
    SELECT u.lexeme, coalesce(array_length(u.positions, 1), 1) AS qtf
    FROM unnest(to_tsvector('english', $1)) u
)"""

_BM25_SCORE = f"""
sum(q.qtf * {IDF} * {term_frequency_part("p.tf", "p.doc_len", "s.avg_doc_len", "$2", "$3")})"""

_BM25_FROM = """
FROM query_terms q
JOIN lexeme_stats l ON l.lexeme = q.lexeme
JOIN postings p ON p.lexeme = q.lexeme
CROSS JOIN corpus_stats s"""

# The top k by BM25, each row also carrying the idf of every query term the corpus has: one
# statement analyses the query once. No row means no term is in the corpus, so no idf either.
_BM25_WITH_IDF = f"""{_QUERY_TERMS},
ranked AS (
    SELECT p.doc_id, {_BM25_SCORE} AS score {_BM25_FROM}
    GROUP BY p.doc_id
    ORDER BY score DESC, p.doc_id
    LIMIT $4
)
SELECT r.doc_id, r.score, i.idf
FROM ranked r
CROSS JOIN (
    SELECT array_agg({IDF}) AS idf
    FROM query_terms q
    JOIN lexeme_stats l ON l.lexeme = q.lexeme
    CROSS JOIN corpus_stats s
) i
ORDER BY r.score DESC, r.doc_id"""

# Bounded lexical search reads each query term's $4 highest-impact postings (all of them for a
# term with fewer), weighted exactly: qtf * idf * BM25's term-frequency part. A document's partial
# score is the sum of its weights read; the $5 best partial scores are returned, each with
# whether the document is missing from a cut list (one with $4 postings read: it may hold more),
# and, in every row, the most any other document can score: its partial score plus the lowest
# weight read (the threshold) of each cut list it is missing from, or the sum of all thresholds
# for a document read in no list.
_BOUNDED_TOP = f"""{_QUERY_TERMS},
terms AS (
    SELECT q.lexeme, q.qtf, {IDF} AS idf, s.avg_doc_len
    FROM query_terms q
    JOIN lexeme_stats l ON l.lexeme = q.lexeme
    CROSS JOIN corpus_stats s
),
read AS (
    SELECT t.lexeme, top.doc_id,
           t.qtf * t.idf * {term_frequency_part("top.tf", "top.doc_len", "t.avg_doc_len", "$2", "$3")} AS weight
    FROM terms t
    CROSS JOIN LATERAL (
        SELECT p.doc_id, p.tf, p.doc_len FROM postings p
        WHERE p.lexeme = t.lexeme
        ORDER BY p.impact DESC, p.doc_id
        LIMIT $4
    ) top
),
cut AS (
    SELECT lexeme, min(weight) AS threshold FROM read GROUP BY lexeme HAVING count(*) >= $4
),
documents AS (
    SELECT r.doc_id, sum(r.weight) AS partial, count(c.lexeme) AS cut_lists_read,
           coalesce(sum(c.threshold), 0) AS thresholds_read,
           row_number() OVER (ORDER BY sum(r.weight) DESC, r.doc_id) AS place
    FROM read r LEFT JOIN cut c ON c.lexeme = r.lexeme
    GROUP BY r.doc_id
),
bounds AS (
    SELECT count(*) AS cut_lists, coalesce(sum(threshold), 0) AS thresholds,
           (SELECT array_agg(idf) FROM terms) AS idf,
           (SELECT coalesce(max(partial - thresholds_read), 0) FROM documents WHERE place > $5) AS others_excess
    FROM cut
)
SELECT d.doc_id, d.partial, d.cut_lists_read < b.cut_lists AS incomplete, b.cut_lists,
       b.thresholds + b.others_excess AS others_bound, b.idf
FROM documents d CROSS JOIN bounds b
WHERE d.place <= $5
ORDER BY d.place"""

# One primary-key lookup per (term, document), however long the terms' postings lists are (the
# LIMIT keeps the planner from turning the lookups into a scan of each term's whole list).
_BM25_OF = f"""{_QUERY_TERMS}
SELECT p.doc_id, {_BM25_SCORE} AS score
FROM query_terms q
JOIN lexeme_stats l ON l.lexeme = q.lexeme
CROSS JOIN (SELECT DISTINCT unnest($4::text[])) AS c (doc_id)
CROSS JOIN LATERAL (
    SELECT p.doc_id, p.tf, p.doc_len FROM postings p
    WHERE p.lexeme = q.lexeme AND p.doc_id = c.doc_id
    LIMIT 1
) p
CROSS JOIN corpus_stats s
GROUP BY p.doc_id"""

_KNN = """
SELECT id, 1 - (embedding <=> $1) AS score
FROM documents
ORDER BY embedding <=> $1
LIMIT $2"""

_COSINE_OF = "SELECT id, 1 - (embedding <=> $1) AS score FROM documents WHERE id = ANY($2::text[])"

_VECTORS_OF = "SELECT id, embedding FROM documents WHERE id = ANY($1::text[])"


@dataclasses.dataclass(frozen=True)
class BoundedLexical:
    ranking: Ranking
    idf: list[float]  # of each query term the corpus has
    exact: bool  # proven equal to exhaustive BM25's top k (given impacts in today's order)
    rescored: int  # documents chosen whose exact score needed postings beyond those read


@dataclasses.dataclass(frozen=True)
class StoredDocument:
    id: str
    title: str
    text: str


class DocumentIndex:
    """Read side of the documents table: the two retrievers and document fetch."""

    def __init__(self, pool: asyncpg.Pool, *, bm25_k1: float, bm25_b: float, ef_search: int,
                 postings_per_term: int = 0):
        """`postings_per_term` bounds lexical search (see `lexical_with_idf`); 0 is exhaustive."""
        self._pool = pool
        self._k1 = bm25_k1
        self._b = bm25_b
        self._ef_search = ef_search
        self._postings_per_term = postings_per_term

    @classmethod
    def configured(cls, pool: asyncpg.Pool, retrieval: RetrievalSettings) -> DocumentIndex:
        return cls(pool, bm25_k1=retrieval.bm25_k1, bm25_b=retrieval.bm25_b, ef_search=retrieval.ef_search,
                   postings_per_term=retrieval.lexical_postings_per_term)

    async def lexical_with_idf(self, query: str, k: int) -> tuple[Ranking, list[float]]:
        """Top `k` documents by BM25 (documents sharing no term with the query are absent), and the
        idf of each query term the corpus has.

        Bounded (`postings_per_term` > 0, `lexical_bounded`): the candidates come from each term's
        highest-impact postings and their scores are exact. A posting costs less read that way
        than aggregated by the exhaustive plan, so it is the faster plan even where no list is cut
        (bench/bounded_lexical_quality.py). 0: every posting is read and aggregated in SQL.
        """
        if self._postings_per_term:
            result = await self.lexical_bounded(query, k)
            return result.ranking, result.idf
        async with unavailable_on_connection_errors("lexical retrieval"):
            rows = await self._pool.fetch(_BM25_WITH_IDF, query, self._k1, self._b, k)
        idf = [float(value) for value in rows[0]["idf"]] if rows else []
        return [(row["doc_id"], float(row["score"])) for row in rows], idf

    async def lexical_bounded(self, query: str, k: int) -> BoundedLexical:
        """Top `k` by BM25 from at most `postings_per_term` postings per query term, highest impact
        first: impact-ordered retrieval with early termination.

        Documents are chosen by the sum of the weights read (a lower bound of their score) and
        then scored exactly, so every score returned is the exhaustive one. The cost is bounded
        by the number of query terms and the cutoff, whatever the collection size. A list is
        cut only for a term with more postings than the cutoff, a common term of low idf; the
        weight of any posting left unread is at most the last one read there (its threshold),
        which proves the top k exact (`exact`) when no document left out could reach the k-th.
        """
        async with unavailable_on_connection_errors("lexical retrieval"):
            rows = await self._pool.fetch(_BOUNDED_TOP, query, self._k1, self._b, self._postings_per_term, k)
        if not rows:  # no query term is in the corpus
            return BoundedLexical([], [], exact=True, rescored=0)
        best = {row["doc_id"]: float(row["partial"]) for row in rows}
        incomplete = [row["doc_id"] for row in rows if row["incomplete"]]
        scores = best | await self.lexical_scores(query, incomplete)
        ranking = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        bounds = rows[0]
        return BoundedLexical(ranking, [float(value) for value in bounds["idf"]], rescored=len(incomplete),
                              exact=not bounds["cut_lists"]
                              or len(ranking) == k and ranking[-1][1] >= float(bounds["others_bound"]))

    async def lexical_scores(self, query: str, ids: Sequence[str]) -> dict[str, float]:
        """BM25 of the given documents (absent: no query term, a real score of 0)."""
        if not ids:
            return {}
        async with unavailable_on_connection_errors("lexical scores"):
            rows = await self._pool.fetch(_BM25_OF, query, self._k1, self._b, list(ids))
        return {row["doc_id"]: float(row["score"]) for row in rows}

    async def dense(self, query_vector: np.ndarray, k: int) -> Ranking:
        """Top `k` documents by cosine similarity to a unit-length query vector."""
        async with (
            unavailable_on_connection_errors("dense retrieval"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            # HNSW returns at most ef_search rows, so the breadth must cover k.
            await connection.execute(
                "SELECT set_config('hnsw.ef_search', $1, true)", str(max(self._ef_search, k))
            )
            rows = await connection.fetch(_KNN, query_vector, k)
        return [(row["id"], float(row["score"])) for row in rows]

    async def dense_scores(self, query_vector: np.ndarray, ids: Sequence[str]) -> dict[str, float]:
        """Cosine similarity of the given documents to a unit-length query vector."""
        if not ids:
            return {}
        async with unavailable_on_connection_errors("dense scores"):
            rows = await self._pool.fetch(_COSINE_OF, query_vector, list(ids))
        return {row["id"]: float(row["score"]) for row in rows}

    async def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored embeddings of the given documents."""
        async with unavailable_on_connection_errors("document vectors"):
            rows = await self._pool.fetch(_VECTORS_OF, list(ids))
        return {row["id"]: row["embedding"].to_numpy().astype(np.float32) for row in rows}

    async def fetch(self, ids: Sequence[str]) -> dict[str, StoredDocument]:
        async with unavailable_on_connection_errors("document fetch"):
            rows = await self._pool.fetch(
                "SELECT id, title, text FROM documents WHERE id = ANY($1::text[])", list(ids)
            )
        return {row["id"]: StoredDocument(row["id"], row["title"], row["text"]) for row in rows}

    async def ping(self) -> None:
        """Raise if the database cannot answer."""
        async with unavailable_on_connection_errors("health check"):
            await self._pool.fetchval("SELECT 1", timeout=2)
