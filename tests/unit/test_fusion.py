import pytest

from serve_app.fusion import complete_score_fusion, reciprocal_rank_fusion, weighted_score_fusion


def test_rrf_sums_reciprocal_ranks():
    lexical = [("a", 9.0), ("b", 5.0)]
    dense = [("b", 0.9), ("c", 0.8)]
    fused = dict(reciprocal_rank_fusion([lexical, dense], k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["c"] == pytest.approx(1 / 62)
    assert [d for d, _ in reciprocal_rank_fusion([lexical, dense], k=60)] == ["b", "a", "c"]


def test_weighted_fusion_normalises_each_list():
    lexical = [("a", 10.0), ("b", 5.0), ("c", 0.0)]
    dense = [("c", 0.9), ("a", 0.5)]
    fused = dict(weighted_score_fusion(lexical, dense, weight=0.25))
    assert fused["a"] == pytest.approx(0.25 * 0.0 + 0.75 * 1.0)
    assert fused["b"] == pytest.approx(0.75 * 0.5)
    assert fused["c"] == pytest.approx(0.25 * 1.0)


def test_weighted_fusion_extremes_reproduce_single_lists():
    lexical = [("a", 3.0), ("b", 2.0)]
    dense = [("b", 0.9), ("a", 0.1)]
    assert [d for d, _ in weighted_score_fusion(lexical, dense, 0.0)] == ["a", "b"]
    assert [d for d, _ in weighted_score_fusion(lexical, dense, 1.0)] == ["b", "a"]


def test_weighted_fusion_rejects_bad_weight_and_handles_empty_lists():
    with pytest.raises(ValueError, match="weight"):
        weighted_score_fusion([], [], 1.5)
    assert weighted_score_fusion([], [("x", 0.3)], 0.5) == [("x", 0.5)]


def test_complete_fusion_scores_a_candidate_missing_from_a_list_by_its_real_score():
    # lexical returned a and b; dense returned c and a. b's cosine (0.85) and c's BM25 (4.0) are real.
    lexical_list, dense_list = [("a", 10.0), ("b", 5.0)], [("c", 0.9), ("a", 0.2)]
    lexical_all, dense_all = {"a": 10.0, "b": 5.0, "c": 4.0}, {"c": 0.9, "a": 0.2, "b": 0.85}
    partial = weighted_score_fusion(lexical_list, dense_list, 0.5)
    complete = complete_score_fusion(lexical_all, dense_all, 0.5)
    assert [d for d, _ in partial] == ["a", "c", "b"]  # b gets 0 for its missing cosine
    assert [d for d, _ in complete] == ["b", "a", "c"]  # b is close to the best on both sides
    fused = dict(complete)
    assert fused["b"] == pytest.approx(0.5 * (0.85 - 0.2) / 0.7 + 0.5 * (5.0 - 4.0) / 6.0)
    assert fused["a"] == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    assert fused["c"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)


def test_complete_fusion_extremes_reproduce_the_lexical_and_dense_orders():
    lexical = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    dense = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    assert [d for d, _ in complete_score_fusion(lexical, dense, 0.0)] == ["a", "b", "c", "d"]
    assert [d for d, _ in complete_score_fusion(lexical, dense, 1.0)] == ["b", "d", "c", "a"]


def test_complete_fusion_gives_a_candidate_no_retriever_scored_the_lowest_lexical_score():
    fused = dict(complete_score_fusion({"a": 2.0, "b": 1.0}, {"a": 0.5, "b": 0.7, "x": 0.9}, 0.5))
    assert fused["x"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.0)  # BM25 0: shares no term with the query


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_complete_fusion_rejects_bad_weight(weight):
    with pytest.raises(ValueError, match="weight"):
        complete_score_fusion({"a": 1.0}, {"a": 0.5}, weight)
