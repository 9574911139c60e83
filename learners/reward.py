"""The reward of a served result list: nDCG of that list against the user's judgements.

Graded judgements map doc id -> grade (0 = not relevant); clicks count as grade 1 each. The
ideal list is built from every judged document, served or not, so a list that missed a highly
relevant document earns less than 1. The reward lies in [0, 1], the scale `tau` assumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from learners.ranking_metrics import ndcg_at_k


def judgements_from_clicks(clicked: Sequence[str]) -> dict[str, float]:
    return {doc_id: 1.0 for doc_id in clicked}


def reward(served_doc_ids: Sequence[str], judgements: Mapping[str, float]) -> float:
    """nDCG@len(served) of the served list; 0 when nothing judged is relevant."""
    if not served_doc_ids:
        return 0.0
    return ndcg_at_k(served_doc_ids, judgements, len(served_doc_ids))
