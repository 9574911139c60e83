"""Reading document collections: BEIR layout (`corpus.jsonl[.gz]`) or any JSONL file.

A malformed line becomes a `LineError` with its number and reason instead of stopping the
read, so one bad record never costs the rest of a collection. Records PostgreSQL would refuse
(a NUL character, invalid Unicode, an id too long for a btree key, a text past tsvector's 1 MB)
are refused here, before the database sees them.
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


# PostgreSQL's btree keys hold at most 2,704 bytes; the postings key is a lexeme (up to 2,047
# bytes) plus the document id, so ids stay well under the remainder.
MAX_ID_BYTES = 512
# A tsvector holds at most 1 MB of lexemes; its input is `title || ' ' || text`.
MAX_TEXT_BYTES = (1 << 20) - 1


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    line: int = dataclasses.field(default=0, compare=False)  # where it was read, for reports

    @property
    def content_sha256(self) -> str:
        return hashlib.sha256(f"{self.title}\n{self.text}".encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class LineError:
    """A skipped record: its line and why, as `kind: detail` (kinds group the run's summary)."""

    line: int
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.partition(":")[0]


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
    """Undecodable bytes become lone surrogates, so only their record is refused (`record_problem`)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return path.open(encoding="utf-8", errors="surrogateescape")


def count_lines(path: Path) -> int:
    """Non-blank lines in the file: the total a progress bar counts to."""
    with _open_text(path) as stream:
        return sum(1 for line in stream if line.strip())


def record_problem(document: Document) -> str | None:
    """Why PostgreSQL would refuse this document, or None when it can be stored."""
    sizes = {}
    for name, value in (("_id", document.id), ("title", document.title), ("text", document.text)):
        if "\x00" in value:
            return f"NUL character: '{name}' contains \\u0000, which PostgreSQL text cannot store"
        try:
            sizes[name] = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return f"invalid UTF-8: '{name}' has an undecodable byte or an escaped lone surrogate (\\ud800)"
    if sizes["_id"] > MAX_ID_BYTES:
        return f"id too long: '_id' is {sizes['_id']:,} bytes, over the {MAX_ID_BYTES}-byte limit of an indexed id"
    if (size := sizes["title"] + 1 + sizes["text"]) > MAX_TEXT_BYTES:
        return f"text too long: title and text are {size:,} bytes, over PostgreSQL's 1 MB tsvector limit"
    return None


def _parse(line: str, number: int) -> Document | str:
    """A document, or the reason this line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"invalid JSON: {error.msg} at column {error.colno}"
    if not isinstance(record, dict):
        return "invalid JSON: expected an object, not a list or a value"
    doc_id = record.get("_id", record.get("id"))
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        return "missing field: '_id' (or 'id'), a non-empty string or integer"
    title = record.get("title") or ""
    text = record.get("text")
    if not isinstance(title, str):
        return "wrong type: 'title' must be a string"
    if not isinstance(text, str) or not text.strip():
        return "missing field: 'text', a non-empty string"
    document = Document(doc_id.strip(), title.strip(), text.strip(), number)
    return record_problem(document) or document


def read_documents(path: Path) -> Iterator[Document | LineError]:
    """Yield each line's document or error; a repeated id is an error on its later line."""
    first_line: dict[str, int] = {}
    with _open_text(corpus_file(path)) as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            parsed = _parse(line, number)
            if isinstance(parsed, str):
                yield LineError(number, parsed)
            elif parsed.id in first_line:
                yield LineError(number, f"duplicate id: {parsed.id!r}, first on line {first_line[parsed.id]}")
            else:
                first_line[parsed.id] = number
                yield parsed
