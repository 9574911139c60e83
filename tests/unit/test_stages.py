"""QueryStages: each stage runs once per query, and an action costs the stages it needs."""

import collections

import numpy as np

from cluster.core.actions import retrieval_actions
from serve_app.stages import QueryStages

EMBED_CPU_MS = 5.0
VECTORS = {doc_id: vector / np.linalg.norm(vector) for doc_id, vector in {
    "a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.8, 0.6, 0.0]),
    "c": np.array([0.0, 1.0, 0.0]), "d": np.array([0.0, 0.6, 0.8])}.items()}


class InMemoryIndex:
    """The four DocumentIndex reads the stages use, over four vectors, counting each call."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def dense(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        self.calls["dense"] += 1
        scores = {doc_id: float(vector @ v) for doc_id, v in VECTORS.items()}
        return sorted(scores.items(), key=lambda item: -item[1])[:k]

    async def vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        self.calls["vectors"] += 1
        return {doc_id: VECTORS[doc_id] for doc_id in ids}

    async def lexical_scores(self, query: str, ids: list[str]) -> dict[str, float]:
        self.calls["lexical_scores"] += 1
        return {doc_id: 0.5 for doc_id in ids}

    async def dense_scores(self, vector: np.ndarray, ids: list[str]) -> dict[str, float]:
        self.calls["dense_scores"] += 1
        return {doc_id: float(vector @ VECTORS[doc_id]) for doc_id in ids}


def stages_for(lexical: list[tuple[str, float]], k: int = 3) -> tuple[QueryStages, InMemoryIndex, list[str]]:
    index, embedded = InMemoryIndex(), []

    async def embed_query(query: str) -> tuple[np.ndarray, float]:
        embedded.append(query)
        return VECTORS["a"], EMBED_CPU_MS

    return QueryStages(index, embed_query, "a query", lexical, k), index, embedded


ACTIONS = retrieval_actions((0.3, 0.5, 0.7))


async def test_every_action_shares_each_stage_it_has_in_common():
    stages, index, embedded = stages_for([("c", 2.0), ("d", 1.0)], k=3)
    outcomes = await stages.run_each(ACTIONS, 2)
    assert len(outcomes) == len(ACTIONS) == 7
    # one embedding; kNN once for the query and once for its PRF vector; one completion per list
    assert embedded == ["a query"]
    assert index.calls == {"dense": 2, "vectors": 1, "lexical_scores": 2, "dense_scores": 2}


async def test_an_action_costs_the_stages_it_needs_whichever_action_ran_them():
    forwards, _, _ = stages_for([("c", 2.0), ("d", 1.0)])
    backwards, _, _ = stages_for([("c", 2.0), ("d", 1.0)])
    ahead = dict(zip((a.name for a in ACTIONS), await forwards.run_each(ACTIONS, 2), strict=True))
    behind = dict(zip((a.name for a in reversed(ACTIONS)), await backwards.run_each(ACTIONS[::-1], 2),
                      strict=True))
    for name, (ranking, cost) in ahead.items():
        assert behind[name][0] == ranking
        if name == "lexical":
            assert cost.cpu_ms == cost.wall_ms == 0.0  # two BM25 matches for depth 2: nothing else ran
        else:  # the embedder's own CPU, never the wall time spent waiting for it
            assert cost.cpu_ms >= EMBED_CPU_MS and behind[name][1].cpu_ms >= EMBED_CPU_MS


async def test_a_short_lexical_list_is_filled_from_dense_and_pays_for_it():
    stages, index, embedded = stages_for([("c", 2.0)])
    ranking, cost = await stages.run(ACTIONS[0], 3)
    assert ACTIONS[0].name == "lexical" and embedded == ["a query"]
    assert [doc_id for doc_id, _ in ranking] == ["c", "a", "b"]  # the BM25 match first, then kNN order
    assert [score for _, score in ranking[1:]] == [0.0, 0.0]
    assert cost.cpu_ms >= EMBED_CPU_MS and index.calls == {"dense": 1}
