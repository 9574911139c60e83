"""Ranking quality metrics with graded relevance, as trec_eval / pytrec_eval compute them.

`qrels` maps doc id -> grade (> 0 is relevant); a ranking is a list of doc ids, best first.
nDCG uses linear gain (grade / log2(rank + 1)), the convention of the BEIR leaderboards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def dcg(grades: Sequence[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """DCG of the top k over the DCG of the ideal top k; 0 when nothing is relevant."""
    ideal = dcg(sorted((g for g in qrels.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([max(qrels.get(doc_id, 0.0), 0.0) for doc_id in ranking[:k]]) / ideal


def precision_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Relevant documents among the top k, over k (a short list is padded with misses)."""
    return sum(1 for doc_id in ranking[:k] if qrels.get(doc_id, 0) > 0) / k


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Relevant documents in the top k, over all relevant; 0 when nothing is relevant."""
    relevant = {doc_id for doc_id, grade in qrels.items() if grade > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)
