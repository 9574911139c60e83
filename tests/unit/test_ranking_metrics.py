import math

import pytest

from learners.ranking_metrics import ndcg_at_k, precision_at_k, recall_at_k


def test_ndcg_hand_computed_with_grades():
    qrels = {"a": 2, "b": 1, "c": 1}
    ranking = ["b", "x", "a"]
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranking, qrels, 10) == pytest.approx(dcg / ideal)


def test_ndcg_perfect_and_empty():
    assert ndcg_at_k(["a", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["a"], {}, 10) == 0.0
    assert ndcg_at_k([], {"a": 1}, 10) == 0.0


def test_precision_pads_short_lists_and_recall_counts_relevant():
    qrels = {"a": 1, "b": 1, "z": 0}
    assert precision_at_k(["a", "z"], qrels, 5) == pytest.approx(1 / 5)
    assert recall_at_k(["a", "z"], qrels, 100) == pytest.approx(1 / 2)
    assert recall_at_k(["a"], {"q": 0}, 100) == 0.0
