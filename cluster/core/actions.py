"""The policy's retrieval actions: run the dense side or not, its fusion weight, dense PRF or not.

Factorised, then pruned to the combinations that differ: with the dense side off there is no
weight to choose and no feedback to add, so the space is `lexical` plus every (weight, PRF)
pair of the configured grid. Names are stable strings (`hybrid@0.5`, `hybrid@0.5+prf`): they
name the action in logs, checkpoints and reports, so a changed grid is detected, not misread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

LEXICAL_ONLY = "lexical"


@dataclasses.dataclass(frozen=True)
class RetrievalAction:
    """What one search runs after its lexical stage."""

    fusion_weight: float | None  # dense share of the fused score; None: the dense side is skipped
    prf: bool = False  # dense pseudo-relevance feedback: a second kNN from the query moved to its top hits

    @property
    def dense(self) -> bool:
        return self.fusion_weight is not None

    @property
    def name(self) -> str:
        if self.fusion_weight is None:
            return LEXICAL_ONLY
        return f"hybrid@{self.fusion_weight:g}" + ("+prf" if self.prf else "")


def gate_groups(actions: Sequence[RetrievalAction]) -> tuple[int, ...]:
    """Per action, its gate group in the value model (`learners.value_model`): by the first factor,
    so skipping the dense side gets half the gates' error budget and the fusion variants share the rest."""
    return tuple(int(action.dense) for action in actions)


def retrieval_actions(fusion_grid: Sequence[float]) -> tuple[RetrievalAction, ...]:
    """`lexical`, then for each weight of the grid: without PRF, with PRF."""
    weights = list(fusion_grid)
    if not weights or len(set(weights)) != len(weights) or not all(0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"the fusion grid needs distinct weights in [0, 1], got {weights}")
    return (RetrievalAction(None), *(RetrievalAction(w, prf) for w in weights for prf in (False, True)))
