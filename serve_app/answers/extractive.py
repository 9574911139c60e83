"""Extractive answers and snippets: the query's best-matching sentences, each citing its document.

Pure text functions with no model, so an answer costs microseconds and never needs a key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from serve_app.retrieval import StoredDocument

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from has have how in is it its of on or that the "
    "their there these this to was what when where which who why will with".split()
)
_STEM_CHARS = 5  # compare words by prefix so "learning" meets "learned" without a stemmer


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    citations: list[str]
    mode: str


def _stems(text: str) -> set[str]:
    return {w[:_STEM_CHARS] for w in _WORD.findall(text.lower()) if w not in _STOP_WORDS}


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _best_sentence(query_stems: set[str], text: str) -> tuple[int, str]:
    """The sentence sharing most stems with the query (the first one on a tie)."""
    best_overlap, best_sentence = -1, ""
    for sentence in split_sentences(text):
        overlap = len(query_stems & _stems(sentence))
        if overlap > best_overlap:
            best_overlap, best_sentence = overlap, sentence
    return max(best_overlap, 0), best_sentence


def snippet(query: str, text: str, max_chars: int = 240) -> str:
    """The most query-like sentence of `text`, cut to `max_chars` at a word boundary."""
    _, sentence = _best_sentence(_stems(query), text)
    if len(sentence) <= max_chars:
        return sentence
    return sentence[: max_chars - 1].rsplit(" ", 1)[0] + "…"


def extractive_answer(query: str, documents: Sequence[StoredDocument], max_sources: int = 3) -> Answer:
    """Up to `max_sources` sentences from the top documents, each followed by its `[doc_id]`.

    Sentences that share no word with the query are left out; if none shares any, the top
    document's best sentence stands alone, so an answer always cites what it shows.
    """
    query_stems = _stems(query)
    picked: list[tuple[str, str]] = []
    for document in documents[:max_sources]:
        overlap, sentence = _best_sentence(query_stems, document.text)
        if overlap > 0:
            picked.append((document.id, sentence))
    if not picked and documents:
        picked.append((documents[0].id, _best_sentence(query_stems, documents[0].text)[1]))
    return Answer(
        text=" ".join(f"{sentence} [{doc_id}]" for doc_id, sentence in picked),
        citations=[doc_id for doc_id, _ in picked],
        mode="extractive",
    )


_CONTRAST = frozenset(
    "not no never however but although though yet despite whereas nevertheless unlike contrary "
    "fail failed fails unclear inconsistent conflicting limited little".split()
)


def contrary_sentences(query: str, documents: Sequence[StoredDocument], max_sources: int = 3) -> Answer:
    """Sentences on the query's topic that contrast, negate or qualify: the critical side of a debate.

    From each top document, the on-topic sentence with a contrast or negation cue that shares most
    words with the query; empty when none has one.
    """
    query_stems = _stems(query)
    picked: list[tuple[str, str]] = []
    for document in documents[:max_sources]:
        candidates = [(len(query_stems & _stems(s)), s) for s in split_sentences(document.text)
                      if _CONTRAST.intersection(_WORD.findall(s.lower()))]
        candidates = [(overlap, s) for overlap, s in candidates if overlap > 0]
        if candidates:
            picked.append((document.id, max(candidates, key=lambda c: c[0])[1]))
    return Answer(
        text=" ".join(f"{sentence} [{doc_id}]" for doc_id, sentence in picked),
        citations=[doc_id for doc_id, _ in picked],
        mode="extractive",
    )
