"""Okapi BM25 as SQL fragments, one definition for every statement that needs them.

The term-frequency part weighs a posting when lexical search scores it (`serve_app.retrieval`)
and orders each term's postings as their impact (`cluster.data.ingest`). The two must agree: a
bounded read takes a list's highest impacts first because they are its highest weights.
"""


def term_frequency_part(tf: str, doc_len: str, avg_doc_len: str, k1: str, b: str) -> str:
    """tf (k1 + 1) / (tf + k1 (1 - b + b doc_len / avg_doc_len)); each argument a SQL expression
    (k1 and b are cast to float8: a bare parameter would be typed as an integer).

    Not parenthesised, so `x * fragment` multiplies left to right as `x * tf * (k1 + 1) / (...)`
    did when each statement spelled it out; use it alone or after a `*`.
    """
    k1, b = f"{k1}::float8", f"{b}::float8"
    return f"{tf} * ({k1} + 1) / ({tf} + {k1} * (1 - {b} + {b} * {doc_len} / greatest({avg_doc_len}, 1e-9)))"


IDF = "ln(1 + (s.n_docs - l.df + 0.5) / (l.df + 0.5))"
"""Lucene's idf of a term, over `corpus_stats s` and the term's `lexeme_stats l`."""
