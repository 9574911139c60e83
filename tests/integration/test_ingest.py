import asyncio
import json
import math
import random
import string
from pathlib import Path

import asyncpg
import pytest

from cluster.cli.main import main as dtrag
from cluster.data import corpus as corpus_module
from cluster.data import ingest as ingest_module
from cluster.data.corpus import MAX_TEXT_BYTES
from cluster.data.ingest import Bm25Shape, ingest
from serve_app.fusion import Ranking
from serve_app.retrieval import DocumentIndex

pytestmark = pytest.mark.integration


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
    assert [(e.line, e.kind) for e in report.errors] == [(2, "invalid JSON"), (4, "missing field")]
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


def random_words(total_bytes: int, seed: int = 0) -> str:
    """Distinct-looking words, so their tsvector is as large as the text (no repeats to fold)."""
    rng = random.Random(seed)
    words, size = [], 0
    while size < total_bytes:
        word = "".join(rng.choices(string.ascii_lowercase, k=9))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def bad_records_corpus(path: Path) -> Path:
    """Good records around one of each kind of bad record; written as bytes (line 6 is not UTF-8)."""
    incompressible_id = "".join(random.Random(1).choices(string.ascii_letters + string.digits, k=4000))
    lines = [
        json.dumps({"_id": "good-1", "title": "Glaciers", "text": "Glaciers carve valleys as they move."}),
        "{broken json",
        json.dumps({"_id": "no-text", "title": "Missing"}),
        json.dumps({"title": "no id", "text": "Somewhere without a name."}),
        json.dumps({"_id": "nul", "text": "Null \u0000 bytes end a C string."}),
        None,  # raw Latin-1 bytes
        json.dumps({"_id": incompressible_id, "text": "An id longer than a btree key."}),
        json.dumps({"_id": "huge", "text": random_words(MAX_TEXT_BYTES + 1000)}),
        json.dumps({"_id": "good-1", "text": "A second record with an id already used."}),
        json.dumps({"_id": "good-2", "title": "Volcanoes", "text": "Volcanoes erupt molten rock called lava."}),
    ]
    with path.open("wb") as stream:
        for line in lines:
            stream.write(b'{"_id": "latin", "text": "caf\xe9"}' if line is None else line.encode())
            stream.write(b"\n")
    return path


async def test_each_kind_of_bad_record_is_skipped_with_its_line(empty_pool, embedder, tmp_path):
    report = await ingest(empty_pool, bad_records_corpus(tmp_path / "bad.jsonl"), embedder.encode,
                          chunk_size=4, show_progress=False)
    assert [(e.line, e.kind) for e in report.errors] == [
        (2, "invalid JSON"), (3, "missing field"), (4, "missing field"), (5, "NUL character"),
        (6, "invalid UTF-8"), (7, "id too long"), (8, "text too long"), (9, "duplicate id")]
    assert (report.read, report.inserted, report.stored, report.statistics_refreshed) == (2, 2, 2, True)
    assert report.skipped_by_kind["missing field"] == 2
    assert [r["id"] for r in await empty_pool.fetch("SELECT id FROM documents ORDER BY id")] == ["good-1", "good-2"]
    assert await empty_pool.fetchval("SELECT n_docs FROM corpus_stats") == 2


async def test_records_postgresql_refuses_are_isolated_from_their_chunk(empty_pool, embedder, tmp_path,
                                                                        monkeypatch):
    """The safety net behind the checks: with them off, PostgreSQL itself refuses the records,
    and the chunk is written again document by document so only those are lost."""
    monkeypatch.setattr(corpus_module, "record_problem", lambda document: None)
    incompressible_id = "".join(random.Random(2).choices(string.ascii_letters + string.digits, k=6000))
    corpus = write_corpus(tmp_path / "refused.jsonl", [
        {"_id": "good-1", "text": "Tides follow the moon."},
        {"_id": "nul", "text": "Null \u0000 byte."},
        {"_id": incompressible_id, "text": "An id longer than a btree key."},
        {"_id": "huge", "text": random_words(MAX_TEXT_BYTES + 1000)},
        {"_id": "good-2", "text": "Owls hunt at night."},
    ])
    report = await ingest(empty_pool, corpus, embedder.encode, chunk_size=8, show_progress=False)
    assert [(e.line, e.kind) for e in report.errors] == [(2, "refused by PostgreSQL"),
                                                         (3, "refused by PostgreSQL"),
                                                         (4, "refused by PostgreSQL")]
    assert (report.inserted, report.updated, report.statistics_refreshed) == (2, 0, True)
    assert [r["id"] for r in await empty_pool.fetch("SELECT id FROM documents ORDER BY id")] == ["good-1", "good-2"]
    assert await empty_pool.fetchval("SELECT count(DISTINCT doc_id) FROM postings") == 2


async def statistics(pool: asyncpg.Pool) -> tuple[list, list]:
    return ([tuple(r) for r in await pool.fetch("SELECT lexeme, df FROM lexeme_stats ORDER BY lexeme")],
            [tuple(r) for r in await pool.fetch("SELECT n_docs, avg_doc_len FROM corpus_stats")])


async def test_interrupted_runs_leave_statistics_to_be_refreshed_by_the_next(empty_pool, embedder, tmp_path,
                                                                              monkeypatch):
    corpus = write_corpus(tmp_path / "docs.jsonl", [
        {"_id": f"d{i}", "text": f"Document {i} about {word}."}
        for i, word in enumerate(["glaciers", "volcanoes", "tides", "owls", "tulips", "comets"])])

    # A crash after two chunks of two were committed: those stay, the statistics do not know them.
    calls = 0

    def embed_then_crash(texts):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("the embedder died")
        return embedder.encode(texts)

    with pytest.raises(RuntimeError, match="embedder died"):
        await ingest(empty_pool, corpus, embed_then_crash, chunk_size=2, show_progress=False)
    assert await empty_pool.fetchval("SELECT count(*) FROM documents") == 4
    assert await empty_pool.fetchval("SELECT dirty FROM statistics_state")
    assert await empty_pool.fetchval("SELECT n_docs FROM corpus_stats") == 0

    # Ctrl-C once every document is written, before the refresh: asyncio.run cancels the main task.
    async def cancelled(*args, **kwargs):
        raise asyncio.CancelledError

    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "refresh_statistics", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await ingest(empty_pool, corpus, embedder.encode, chunk_size=2, show_progress=False)
    assert await empty_pool.fetchval("SELECT count(*) FROM documents") == 6
    assert await empty_pool.fetchval("SELECT dirty FROM statistics_state")
    assert await empty_pool.fetchval("SELECT n_docs FROM corpus_stats") == 0

    def embed_must_not_run(texts):
        raise AssertionError(f"unchanged documents were re-embedded: {texts}")

    # The re-run finds every document unchanged, and still brings the statistics up to date.
    report = await ingest(empty_pool, corpus, embed_must_not_run, show_progress=False)
    assert (report.unchanged, report.statistics_refreshed) == (6, True)
    assert not await empty_pool.fetchval("SELECT dirty FROM statistics_state")
    after_rerun = await statistics(empty_pool)
    await empty_pool.execute("REFRESH MATERIALIZED VIEW lexeme_stats")  # what a clean run computes
    await empty_pool.execute("REFRESH MATERIALIZED VIEW corpus_stats")
    assert after_rerun == await statistics(empty_pool)
    assert after_rerun[1] == [(6, pytest.approx(3.0))]
    index = DocumentIndex(empty_pool, bm25_k1=0.9, bm25_b=0.4, ef_search=40)
    assert [d for d, _ in await lexical(index, "comets", 5)] == ["d5"]

    again = await ingest(empty_pool, corpus, embed_must_not_run, show_progress=False)
    assert not again.statistics_refreshed  # nothing changed since: no refresh


async def impacts_off_their_weight(pool: asyncpg.Pool, bm25: Bm25Shape) -> float:
    """The largest gap between a posting's impact and BM25's term-frequency part under `bm25` now."""
    return await pool.fetchval(
        """SELECT coalesce(max(abs(p.impact - p.tf * ($1::float8 + 1)
                                / (p.tf + $1::float8 * (1 - $2::float8 + $2::float8 * p.doc_len / c.avg_doc_len)))), 0)
           FROM postings p CROSS JOIN corpus_stats c""", bm25.k1, bm25.b)


async def test_impacts_follow_the_bm25_shape_and_the_collections_average_length(empty_pool, embedder, tmp_path):
    """A refresh recomputes every impact when k1 or b changes, or the average length moves by
    more than IMPACT_DRIFT; within it, they stay as written."""
    default, other = Bm25Shape(0.9, 0.4), Bm25Shape(1.2, 0.75)
    short = [{"_id": f"s{i}", "text": f"Tulips and owls, number {i}."} for i in range(8)]
    corpus = write_corpus(tmp_path / "docs.jsonl", short)
    await ingest(empty_pool, corpus, embedder.encode, chunk_size=3, show_progress=False, bm25=default)
    # the first refresh finds no recorded shape, recomputes and records it
    assert await impacts_off_their_weight(empty_pool, default) < 1e-6
    shape = "SELECT impact_k1, impact_b, impact_avg_doc_len FROM statistics_state"
    average = await empty_pool.fetchval("SELECT avg_doc_len FROM corpus_stats")
    assert tuple(await empty_pool.fetchrow(shape)) == (0.9, 0.4, pytest.approx(average))

    async with empty_pool.acquire() as connection:
        assert not await ingest_module.refresh_statistics(connection, other)  # statistics fresh, shape not
    assert await impacts_off_their_weight(empty_pool, other) < 1e-6
    assert tuple(await empty_pool.fetchrow(shape))[:2] == (1.2, 0.75)

    # One more short document moves the average by less than a tenth: impacts stay as written.
    write_corpus(corpus, [*short, {"_id": "s8", "text": "Tulips and owls, number 8, grey."}])
    await ingest(empty_pool, corpus, embedder.encode, show_progress=False, bm25=other)
    moved = await empty_pool.fetchval("SELECT avg_doc_len FROM corpus_stats")
    assert 0 < abs(moved / average - 1) <= ingest_module.IMPACT_DRIFT
    assert (await empty_pool.fetchrow(shape))["impact_avg_doc_len"] == pytest.approx(average)

    # Long documents double it: every impact is recomputed with the new average.
    long = [{"_id": f"l{i}", "text": random_words(600, seed=i)} for i in range(8)]
    write_corpus(corpus, [*short, *long])
    await ingest(empty_pool, corpus, embedder.encode, show_progress=False, bm25=other)
    grown = await empty_pool.fetchval("SELECT avg_doc_len FROM corpus_stats")
    assert grown > 2 * average
    assert await impacts_off_their_weight(empty_pool, other) < 1e-6
    assert (await empty_pool.fetchrow(shape))["impact_avg_doc_len"] == pytest.approx(grown)


def test_dtrag_ingest_summarises_skips_and_fails_only_when_nothing_is_stored(fresh_database_url, monkeypatch,
                                                                               tmp_path: Path, capsys):
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    bad = write_corpus(tmp_path / "bad.jsonl", [{"_id": "n", "text": "a\u0000b"}, "{oops"])
    assert dtrag(["ingest", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "line 1: NUL character" in captured.err and "line 2: invalid JSON" in captured.err
    assert "no document of" in captured.err
    assert "0 inserted" in captured.out and "2 skipped (1 NUL character, 1 invalid JSON)" in captured.out

    mixed = write_corpus(tmp_path / "mixed.jsonl", [{"_id": "ok", "text": "Tides follow the moon."}, "{oops"])
    assert dtrag(["ingest", str(mixed)]) == 0
    assert "1 inserted" in (out := capsys.readouterr().out) and "1 skipped (1 invalid JSON)" in out
