"""Rank fusion of lexical and dense result lists (pure functions, no I/O).

A ranking is a list of `(doc_id, score)` pairs, best first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Ranking = list[tuple[str, float]]


def reciprocal_rank_fusion(rankings: Sequence[Ranking], k: int = 60) -> Ranking:
    """RRF (Cormack et al. 2009): score(d) = sum over lists of 1 / (k + rank(d)), rank from 1.

    Uses ranks only, so it needs no score calibration between retrievers.
    """
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (doc_id, _) in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def _min_max(ranking: Ranking) -> dict[str, float]:
    """Scores rescaled to [0, 1] within the list; a list of equal scores maps to 1."""
    if not ranking:
        return {}
    scores = [score for _, score in ranking]
    low, high = min(scores), max(scores)
    span = high - low
    return {doc_id: (score - low) / span if span > 0 else 1.0 for doc_id, score in ranking}


def weighted_score_fusion(lexical: Ranking, dense: Ranking, weight: float = 0.5) -> Ranking:
    """Convex combination of min-max normalised scores: weight * dense + (1 - weight) * lexical.

    A document missing from one list contributes 0 from that list.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    lexical_norm, dense_norm = _min_max(lexical), _min_max(dense)
    fused = {
        doc_id: weight * dense_norm.get(doc_id, 0.0) + (1 - weight) * lexical_norm.get(doc_id, 0.0)
        for doc_id in lexical_norm.keys() | dense_norm.keys()
    }
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def complete_score_fusion(lexical: Mapping[str, float], dense: Mapping[str, float], weight: float) -> Ranking:
    """weight * dense + (1 - weight) * lexical over min-max normalised *complete* scores.

    Both mappings score every candidate of either list: a candidate one retriever did not
    return gets its real score from that side (its cosine, or its BM25, which is 0 only when it
    shares no term with the query), instead of the 0 that partial-list fusion gives it.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    candidates = lexical.keys() | dense.keys()
    lexical_norm = _min_max([(d, lexical.get(d, 0.0)) for d in candidates])
    dense_norm = _min_max([(d, dense[d]) for d in candidates if d in dense])
    fused = {d: weight * dense_norm.get(d, 0.0) + (1 - weight) * lexical_norm[d] for d in candidates}
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))
