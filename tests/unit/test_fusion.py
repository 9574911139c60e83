import pytest

from serve_app.fusion import reciprocal_rank_fusion, weighted_score_fusion


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
