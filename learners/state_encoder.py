"""Stable, human-readable state keys for a query: labels that group searches in logs and reports.

    >>> encode_state("Who wrote Hamlet?", ["d1", "d2", "d3"], ["d3", "d4", "d5", "d6", "d7"])
    'len=short|form=question|agree=mid|digits=no'

Features, each a small closed set of values, so a report can break results down by key (the
policy itself reads the continuous `learners.context` features):
    len     word tokens: short <= 3, medium <= 8, long > 8
    form    question (ends with '?' or starts with a question word or auxiliary verb),
            statement (has a function word: a sentence or claim), else keyword
    agree   Jaccard overlap of the lexical and dense top-10 ids: low < 0.1, mid < 0.4, else
            high (for two full lists: 0-1, 2-5, 6-10 shared); none when either list is empty
    digits  whether a token has a digit (codes, years, versions favour exact lexical matching)

The word lists are English. Keys depend only on the inputs (no hash(), no randomness), so every
process agrees. There are 3 * 3 * 4 * 2 = 72 possible keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TOP_K = 10
LENGTHS = ("short", "medium", "long")
FORMS = ("question", "statement", "keyword")
AGREEMENTS = ("none", "low", "mid", "high")
DIGITS = ("no", "yes")

QUESTION_WORDS = frozenset(
    "what who whom whose when where why which how "
    "is are was were am do does did can could should would will shall may might must "
    "has have had".split()
)
FUNCTION_WORDS = frozenset(
    "a an the is are was were be been being am of in on at to from by for with about as "
    "that this these those it its has have had do does did not no and or but than "
    "can could should would will shall may might must".split()
)
_TOKEN = re.compile(r"\w+")



def encode_state(query: str, lexical_ids: Sequence[str], dense_ids: Sequence[str]) -> str:
    """The state key of a query and the ranked ids its lexical and dense retrievers returned."""
    tokens = _TOKEN.findall(query.casefold())
    return (
        f"len={_length(tokens)}|form={question_or_statement(query, tokens)}"
        f"|agree={_agreement(lexical_ids, dense_ids)}"
        f"|digits={'yes' if any(c.isdigit() for c in query) else 'no'}"
    )


def _length(tokens: list[str]) -> str:
    return "short" if len(tokens) <= 3 else "medium" if len(tokens) <= 8 else "long"


def question_or_statement(query: str, tokens: Sequence[str]) -> str:
    """The query's form: question, statement or keyword; `tokens` are its casefolded words."""
    if query.rstrip().endswith("?") or (tokens and tokens[0] in QUESTION_WORDS):
        return "question"
    return "statement" if FUNCTION_WORDS.intersection(tokens) else "keyword"


def _agreement(lexical_ids: Sequence[str], dense_ids: Sequence[str]) -> str:
    lexical, dense = set(lexical_ids[:TOP_K]), set(dense_ids[:TOP_K])
    if not lexical or not dense:
        return "none"
    jaccard = len(lexical & dense) / len(lexical | dense)
    return "low" if jaccard < 0.1 else "mid" if jaccard < 0.4 else "high"
