import pytest

from cluster.core.actions import LEXICAL_ONLY, RetrievalAction, gate_groups, retrieval_actions


def test_grid_gives_lexical_then_each_weight_without_and_with_prf():
    actions = retrieval_actions((0.3, 0.5, 0.7))
    assert [a.name for a in actions] == [
        "lexical", "hybrid@0.3", "hybrid@0.3+prf", "hybrid@0.5", "hybrid@0.5+prf", "hybrid@0.7", "hybrid@0.7+prf"]
    assert [(a.fusion_weight, a.prf) for a in actions] == [
        (None, False), (0.3, False), (0.3, True), (0.5, False), (0.5, True), (0.7, False), (0.7, True)]
    assert [a.dense for a in actions] == [False] + [True] * 6
    assert gate_groups(actions) == (0, 1, 1, 1, 1, 1, 1)  # grouped by the first factor: dense or not


def test_names_are_stable_and_distinct():
    actions = retrieval_actions([0.0, 0.25, 1.0])
    names = [a.name for a in actions]
    assert names == ["lexical", "hybrid@0", "hybrid@0+prf", "hybrid@0.25", "hybrid@0.25+prf", "hybrid@1", "hybrid@1+prf"]
    assert len(set(names)) == len(names)
    assert RetrievalAction(None).name == LEXICAL_ONLY
    assert actions.index(RetrievalAction(0.25)) == 3 and actions.index(RetrievalAction(0.25, prf=True)) == 4  # by value


@pytest.mark.parametrize("grid", [(), (0.5, 0.5), (-0.1, 0.5), (0.5, 1.5), (float("nan"),)])
def test_invalid_grids_are_rejected(grid):
    with pytest.raises(ValueError, match="fusion grid"):
        retrieval_actions(grid)
