import gzip
import json
from pathlib import Path

import pytest

from cluster.data.beir import load_queries
from cluster.data.corpus import (
    MAX_ID_BYTES,
    MAX_TEXT_BYTES,
    CorpusError,
    Document,
    LineError,
    corpus_file,
    count_lines,
    read_documents,
    record_problem,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_beir_folder_gz_and_reports_bad_lines(tmp_path: Path):
    lines = [
        json.dumps({"_id": "1", "title": "T", "text": "one"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"title": "no id", "text": "x"}),
        json.dumps({"_id": "2", "text": "   "}),
        json.dumps({"_id": 3, "text": "integer id"}),
        "",
        json.dumps({"_id": "1", "text": "again"}),
        json.dumps({"_id": "4", "title": 7, "text": "x"}),
    ]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as stream:
        stream.write("\n".join(lines) + "\n")
    items = list(read_documents(tmp_path))
    assert [i for i in items if isinstance(i, Document)] == [
        Document("1", "T", "one"), Document("3", "", "integer id")
    ]
    errors = {e.line: e.reason for e in items if isinstance(e, LineError)}
    assert set(errors) == {2, 3, 4, 5, 8, 9}
    assert errors[2].startswith("invalid JSON")
    assert "_id" in errors[4]
    assert "text" in errors[5]
    assert "first on line 1" in errors[8]
    assert "title" in errors[9]
    assert {e.kind for e in items if isinstance(e, LineError)} == {
        "invalid JSON", "missing field", "duplicate id", "wrong type"}
    assert count_lines(tmp_path / "corpus.jsonl.gz") == 8


def test_plain_jsonl_accepts_id_field(tmp_path: Path):
    path = write_lines(tmp_path / "docs.jsonl", [json.dumps({"id": "x", "text": "hello"})])
    assert list(read_documents(path)) == [Document("x", "", "hello")]


def test_missing_corpus_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CorpusError, match="corpus.jsonl"):
        corpus_file(tmp_path)
    with pytest.raises(CorpusError, match="no such file"):
        corpus_file(tmp_path / "nope.jsonl")


def test_content_hash_changes_with_title_or_text():
    base = Document("1", "a", "b")
    assert base.content_sha256 == Document("1", "a", "b").content_sha256
    assert base.content_sha256 != Document("1", "a", "c").content_sha256
    assert base.content_sha256 != Document("1", "ab", "").content_sha256


@pytest.mark.parametrize(("document", "kind", "names"), [
    (Document("a\x00b", "", "text"), "NUL character", "'_id'"),
    (Document("a", "ti\x00tle", "text"), "NUL character", "'title'"),
    (Document("a", "", "te\x00xt"), "NUL character", "'text'"),
    (Document("a", "", "lone \ud800 surrogate"), "invalid UTF-8", "'text'"),
    (Document("x" * (MAX_ID_BYTES + 1), "", "text"), "id too long", f"{MAX_ID_BYTES + 1:,} bytes"),
    (Document("é" * (MAX_ID_BYTES // 2 + 1), "", "text"), "id too long", "bytes"),  # bytes, not characters
    (Document("a", "", "w " * (MAX_TEXT_BYTES // 2 + 1)), "text too long", "1 MB"),
    (Document("a", "t" * 10, "x" * (MAX_TEXT_BYTES - 10)), "text too long", "title and text"),
])
def test_records_postgresql_would_refuse_are_named(document: Document, kind: str, names: str):
    problem = record_problem(document)
    assert problem is not None and problem.startswith(f"{kind}: ") and names in problem


@pytest.mark.parametrize("document", [
    Document("x" * MAX_ID_BYTES, "", "text"),
    Document("a", "t" * 10, "x" * (MAX_TEXT_BYTES - 11)),  # title + space + text: exactly the limit
    Document("ünï-cødé", "Tïtle", "tab\tand\x01control characters other than NUL are stored"),
])
def test_records_at_the_limits_are_accepted(document: Document):
    assert record_problem(document) is None


def test_bad_records_are_reported_with_their_line_and_the_rest_read(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    with path.open("wb") as stream:
        stream.write(json.dumps({"_id": "ok-1", "text": "fine"}).encode() + b"\n")
        stream.write(json.dumps({"_id": "nul", "text": "a\u0000b"}).encode() + b"\n")  # JSON escape of NUL
        stream.write(b'{"_id": "bad-bytes", "text": "caf\xe9"}\n')  # Latin-1, not UTF-8
        stream.write(json.dumps({"_id": "x" * 3000, "text": "long id"}).encode() + b"\n")
        stream.write(json.dumps({"_id": "ok-2", "text": "also fine"}).encode() + b"\n")
    items = list(read_documents(path))
    assert [(d.id, d.line) for d in items if isinstance(d, Document)] == [("ok-1", 1), ("ok-2", 5)]
    assert [(e.line, e.kind) for e in items if isinstance(e, LineError)] == [
        (2, "NUL character"), (3, "invalid UTF-8"), (4, "id too long")]
    assert count_lines(path) == 5


def test_a_bad_query_line_is_named(tmp_path: Path):
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "fine"}\n\n{"_id": "q2"}\n')
    with pytest.raises(CorpusError, match=r"queries.jsonl, line 3"):
        load_queries(tmp_path)
    (tmp_path / "queries.jsonl").write_text('{"_id": 1, "text": "fine"}\n')
    assert load_queries(tmp_path) == {"1": "fine"}
