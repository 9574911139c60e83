"""The policy's context: numbers about a query and its lexical results, known before dense runs.

Lexical retrieval runs first, so its statistics decide whether the dense side will pay. Query
performance predictors from the IR literature, computed on the BM25 scores s_1 >= s_2 >= ...
of the candidate list and the idf of the query's terms, made scale-free (BM25 scores differ by
collection) by dividing by s_1 or by the sum of idfs:

    query_words     log(1 + word tokens)
    matched_terms   log(1 + query terms the collection has)
    idf_max, idf_mean, idf_min   of those terms (0 when none)
    hit_share       candidates returned / candidates asked for (short lists: rare terms)
    top_score       s_1 / sum idf               how much of the query the best match covers
    top_gap         (s_1 - s_2) / s_1           one clear winner?
    tenth_ratio     s_10 / s_1                  a flat head means many equally good matches
    wig             (mean s_1..5 - mean s) / s_1    weighted information gain, list-normalised
    nqc             std s_1..20 / mean s_1..20   normalised query commitment
    question, statement, digits     the query's form (`learners.state_encoder`), 0 or 1

No hashing or randomness: every process computes the same vector for the same inputs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from learners.state_encoder import question_or_statement

FEATURES: tuple[str, ...] = (
    "query_words", "matched_terms", "idf_max", "idf_mean", "idf_min", "hit_share", "top_score",
    "top_gap", "tenth_ratio", "wig", "nqc", "question", "statement", "digits",
)
_TOKEN = re.compile(r"\w+")


def lexical_context(query: str, scores: Sequence[float], idf: Sequence[float], depth: int) -> np.ndarray:
    """The context of a query from its BM25 scores (best first, at most `depth`) and term idfs; (d,)."""
    tokens = _TOKEN.findall(query.casefold())
    s = np.asarray(scores, np.float64)
    idf_values = np.asarray(idf, np.float64)
    form = question_or_statement(query, tokens)
    features = [
        np.log1p(len(tokens)),
        np.log1p(len(idf_values)),
        *((idf_values.max(), idf_values.mean(), idf_values.min()) if len(idf_values) else (0.0, 0.0, 0.0)),
        len(s) / depth if depth else 0.0,
    ]
    if len(s) and s[0] > 0:
        head = s[:20]
        features += [
            s[0] / max(idf_values.sum(), 1e-9),
            (s[0] - (s[1] if len(s) > 1 else 0.0)) / s[0],
            (s[9] if len(s) > 9 else 0.0) / s[0],
            (s[:5].mean() - s.mean()) / s[0],
            head.std() / head.mean(),
        ]
    else:
        features += [0.0] * 5
    features += [float(form == "question"), float(form == "statement"),
                 float(any(c.isdigit() for c in query))]
    return np.asarray(features, np.float64)
