import gzip
import json
from pathlib import Path

import pytest

from cluster.data.corpus import CorpusError, Document, LineError, corpus_file, count_lines, read_documents


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
