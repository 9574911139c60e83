"""Reading document collections: BEIR layout (`corpus.jsonl[.gz]`) or any JSONL file.

A malformed line becomes a `LineError` with its number and reason instead of stopping the
read, so one bad record never costs the rest of a collection.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import IO


def sample_corpus_dir() -> Path:
    """The small collection shipped with the package, served when the database is empty."""
    return Path(str(resources.files("cluster.data").joinpath("sample_corpus")))


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str

    @property
    def content_sha256(self) -> str:
        return hashlib.sha256(f"{self.title}\n{self.text}".encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class LineError:
    line: int
    reason: str


class CorpusError(ValueError):
    """The path does not name a readable collection."""


def corpus_file(path: Path) -> Path:
    """The JSONL file behind `path`: the file itself, or a BEIR folder's corpus file."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("corpus.jsonl.gz", "corpus.jsonl"):
            if (path / name).is_file():
                return path / name
        raise CorpusError(f"{path} has no corpus.jsonl or corpus.jsonl.gz (BEIR layout expected)")
    raise CorpusError(f"{path}: no such file or folder")


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def count_lines(path: Path) -> int:
    """Non-blank lines in the file: the total a progress bar counts to."""
    with _open_text(path) as stream:
        return sum(1 for line in stream if line.strip())


def _parse(line: str) -> Document | str:
    """A document, or the reason this line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"invalid JSON: {error.msg} at column {error.colno}"
    if not isinstance(record, dict):
        return "expected a JSON object"
    doc_id = record.get("_id", record.get("id"))
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        return "missing '_id' (or 'id'): a non-empty string or integer is required"
    title = record.get("title") or ""
    text = record.get("text")
    if not isinstance(title, str):
        return "'title' must be a string"
    if not isinstance(text, str) or not text.strip():
        return "missing 'text': a non-empty string is required"
    return Document(doc_id.strip(), title.strip(), text.strip())


def read_documents(path: Path) -> Iterator[Document | LineError]:
    """Yield each line's document or error; a repeated id is an error on its later line."""
    first_line: dict[str, int] = {}
    with _open_text(corpus_file(path)) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            parsed = _parse(line)
            if isinstance(parsed, str):
                yield LineError(number, parsed)
            elif parsed.id in first_line:
                yield LineError(number, f"duplicate id {parsed.id!r}, first on line {first_line[parsed.id]}")
            else:
                first_line[parsed.id] = number
                yield parsed
