"""Scores of policies over a (queries x actions) matrix of nDCG, computed once per query and action.

Any Q-table (the final one, or snapshots taken while learning) is scored offline from the same
matrix, so a learning curve costs no further searches. Q-tables are JSON-shaped: state key to
the row Q(s, .); a state the table never saw acts on the pooled row, as in the service.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np

from learners.soft_q import policy_from_q

QTable = Mapping[str, Sequence[float]]


def q_rows(states: Sequence[str], q_table: QTable, pooled: Sequence[float]) -> np.ndarray:
    """Q(s, .) per query; a state the table never saw has the pooled row, as in the service.

    Shape (queries, actions).
    """
    return np.array([q_table.get(s, pooled) for s in states], np.float64)


def greedy_actions(states: Sequence[str], q_table: QTable, pooled: Sequence[float]) -> np.ndarray:
    """argmax_a Q(s, a) per query (the first on ties); shape (queries,)."""
    return q_rows(states, q_table, pooled).argmax(axis=1)


def mean_ndcg(scores: np.ndarray, actions: np.ndarray) -> float:
    """Mean of scores[i, actions[i]]: the nDCG of the policy that serves actions[i] to query i."""
    return float(scores[np.arange(len(actions)), actions].mean())


def expected_ndcg(
    scores: np.ndarray, states: Sequence[str], q_table: QTable, pooled: Sequence[float], tau: float
) -> float:
    """Mean over queries of sum_a softmax(Q(s,.)/tau)(a) * scores[i, a]: what sampling earns."""
    return float((policy_from_q(q_rows(states, q_table, pooled), tau) * scores).sum(axis=1).mean())


def oracle_actions(scores: np.ndarray, states: Sequence[str]) -> np.ndarray:
    """Per state, the action with the best mean score over its queries (first on ties).

    No policy that sees only the state key can beat it on these queries: an upper bound.
    """
    rows: dict[str, list[int]] = collections.defaultdict(list)
    for i, state in enumerate(states):
        rows[state].append(i)
    best = {state: int(np.argmax(scores[i].mean(axis=0))) for state, i in rows.items()}
    return np.array([best[s] for s in states], np.int64)
