"""Grounded generation: number the retrieved passages in the prompt, map the answer's citations back.

The model sees passages as [1], [2], ... and cites them that way; `cite` turns each marker into
the document's id, the form extractive answers use (`[doc_id]`), and drops markers that name a
passage it was not shown (counted, so a model that invents sources is visible in metrics).
Pure text functions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from serve_app.retrieval import StoredDocument

INSTRUCTIONS = (
    "Answer the question using only the numbered passages. Cite each claim with the number of the "
    "passage that supports it in square brackets, like [1] or [2][3]. If the passages do not "
    "answer the question, say so briefly. Do not mention passages you were not given."
)
_MARKER = re.compile(r"\[(\s*\d+(?:\s*,\s*\d+)*\s*)\]")


@dataclasses.dataclass(frozen=True)
class Prompt:
    system: str
    user: str
    passages: tuple[StoredDocument, ...]  # passage n is passages[n - 1]


@dataclasses.dataclass(frozen=True)
class CitedText:
    text: str  # markers rewritten as [doc_id]
    citations: list[str]  # doc ids in order of first citation
    dropped: int  # markers (or numbers in a marker) naming no given passage


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)].rsplit(" ", 1)[0] + "…"


def build_prompt(query: str, documents: Sequence[StoredDocument], max_chars: int,
                 instructions: str = INSTRUCTIONS) -> Prompt:
    """The question and the documents as numbered passages, shortened evenly to fit `max_chars`."""
    question = f"Question: {query}\n\nPassages:\n"
    room = max(0, max_chars - len(question))
    per_passage = room // len(documents) if documents else 0
    passages = []
    for number, document in enumerate(documents, start=1):
        label = f"[{number}] {document.title}. " if document.title else f"[{number}] "
        passages.append(label + _clip(document.text, max(0, per_passage - len(label) - 1)))
    return Prompt(instructions, question + "\n".join(passages), tuple(documents))


def cite(text: str, passages: Sequence[StoredDocument]) -> CitedText:
    """Rewrite `[n]` / `[n, m]` markers to doc ids; drop numbers outside 1..len(passages)."""
    citations: list[str] = []
    dropped = 0

    def rewrite(match: re.Match[str]) -> str:
        nonlocal dropped
        ids = []
        for number in (int(n) for n in match[1].split(",")):
            if 1 <= number <= len(passages):
                ids.append(passages[number - 1].id)
            else:
                dropped += 1
        for doc_id in ids:
            if doc_id not in citations:
                citations.append(doc_id)
        return "".join(f"[{doc_id}]" for doc_id in dict.fromkeys(ids))

    rewritten = _MARKER.sub(rewrite, text)
    return CitedText(re.sub(r"[ \t]+([.,;:])", r"\1", rewritten).strip(), citations, dropped)


class StreamingCiter:
    """`cite` over a stream of deltas: a marker split across deltas is held back until it closes."""

    def __init__(self, passages: Sequence[StoredDocument]):
        self._passages = passages
        self._pending = ""
        self._written: list[str] = []
        self.citations: list[str] = []
        self.dropped = 0

    def add(self, delta: str) -> str:
        """What can be shown of the text so far, rewritten; may be empty while a marker is open."""
        self._pending += delta
        cut = self._pending.rfind("[")
        if cut == -1 or "]" in self._pending[cut:] or len(self._pending) - cut > 24:
            cut = len(self._pending)  # nothing open (an unclosed "[" this far back is no marker)
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return self._emit(ready)

    def finish(self) -> CitedText:
        """The held-back tail, rewritten (as `text`), with the citations of the whole stream."""
        tail, self._pending = self._pending, ""
        return CitedText(self._emit(tail), self.citations, self.dropped)

    def text(self) -> str:
        return "".join(self._written).strip()

    def _emit(self, ready: str) -> str:
        if not ready:
            return ""
        cited = cite(ready, self._passages) if "[" in ready else CitedText(ready, [], 0)
        text = _keep_edges(ready, cited.text) if cited.text != ready else ready  # cite() strips the ends
        self.citations += [doc_id for doc_id in cited.citations if doc_id not in self.citations]
        self.dropped += cited.dropped
        self._written.append(text)
        return text


def _keep_edges(original: str, rewritten: str) -> str:
    lead = original[: len(original) - len(original.lstrip())]
    trail = original[len(original.rstrip()):]
    return lead + rewritten + trail
