import json
import math
from pathlib import Path

import asyncpg
import pytest

from cluster.platform.database import create_pool
from cluster.data.ingest import ingest
from cluster.platform.migrate import migrate
from serve_app.fusion import Ranking
from serve_app.retrieval import DocumentIndex

pytestmark = pytest.mark.integration


@pytest.fixture
async def empty_pool(fresh_database_url: str, live_settings):
    connection = await asyncpg.connect(fresh_database_url)
    await migrate(connection)
    await connection.close()
    pool = await create_pool(fresh_database_url, live_settings.database)
    yield pool
    await pool.close()


async def lexical(index: DocumentIndex, query: str, k: int) -> Ranking:
    """The BM25 ranking alone."""
    ranking, _ = await index.lexical_with_idf(query, k)
    return ranking


def write_corpus(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


async def test_ingest_upserts_reports_bad_lines_and_reruns_as_no_op(empty_pool, embedder, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", [
        {"_id": "a", "title": "Glaciers", "text": "Glaciers carve valleys as they slowly move."},
        "{broken",
        {"_id": "b", "title": "Volcanoes", "text": "Volcanoes erupt molten rock called lava."},
        {"_id": "c"},
    ])
    report = await ingest(empty_pool, corpus, embedder.encode, show_progress=False)
    assert (report.read, report.inserted, report.updated, report.unchanged) == (2, 2, 0, 0)
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (2, "invalid JSON"), (4, "missing 'text'")
    ]
    before = await empty_pool.fetch("SELECT id, ingested_at FROM documents ORDER BY id")

    def embed_must_not_run(texts):
        raise AssertionError(f"unchanged documents were re-embedded: {texts}")

    again = await ingest(empty_pool, corpus, embed_must_not_run, show_progress=False)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    assert await empty_pool.fetch("SELECT id, ingested_at FROM documents ORDER BY id") == before


async def test_changed_document_is_rewritten_with_its_postings(empty_pool, embedder, tmp_path):
    index = DocumentIndex(empty_pool, bm25_k1=0.9, bm25_b=0.4, ef_search=40)
    corpus = tmp_path / "docs.jsonl"
    write_corpus(corpus, [{"_id": "a", "text": "Tulips bloom in spring."},
                          {"_id": "b", "text": "Owls hunt at night."}])
    await ingest(empty_pool, corpus, embedder.encode, show_progress=False)
    assert [d for d, _ in await lexical(index, "tulips", 5)] == ["a"]

    write_corpus(corpus, [{"_id": "a", "text": "Sunflowers follow the sun."},
                          {"_id": "b", "text": "Owls hunt at night."}])
    report = await ingest(empty_pool, corpus, embedder.encode, show_progress=False)
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 1)
    assert await lexical(index, "tulips", 5) == []
    assert [d for d, _ in await lexical(index, "sunflowers", 5)] == ["a"]
    stats = await empty_pool.fetchrow("SELECT n_docs, avg_doc_len FROM corpus_stats")
    assert stats["n_docs"] == 2 and stats["avg_doc_len"] > 0


async def test_sample_corpus_is_fully_loaded(pool):
    assert await pool.fetchval("SELECT count(*) FROM documents") == 160
    assert await pool.fetchval("SELECT count(*) FROM documents WHERE doc_len = 0") == 0
    assert await pool.fetchval("SELECT n_docs FROM corpus_stats") == 160


def test_real_scifact_corpus_parses_cleanly(scifact: Path):
    from cluster.data.corpus import Document, read_documents

    items = list(read_documents(scifact))
    assert len(items) == 5183
    assert all(isinstance(i, Document) for i in items)


async def test_bm25_score_matches_a_hand_computation(empty_pool, embedder, tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", [{"_id": "a", "text": "apple apple banana"},
                                                    {"_id": "b", "text": "cherry"}])
    await ingest(empty_pool, corpus, embedder.encode, show_progress=False)
    k1, b = 0.9, 0.4
    index = DocumentIndex(empty_pool, bm25_k1=k1, bm25_b=b, ef_search=40)
    # N = 2, avgdl = (3 + 1) / 2, df(appl) = 1, tf = 2, dl = 3: Lucene idf and BM25 saturation.
    idf = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 * (k1 + 1) / (2 + k1 * (1 - b + b * 3 / 2))
    assert await lexical(index, "apples", 5) == [("a", pytest.approx(expected))]
