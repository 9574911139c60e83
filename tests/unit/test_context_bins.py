import numpy as np
import pytest

from learners.context_bins import ContextBins


def test_unset_bins_give_the_intercept_alone():
    bins = ContextBins.unset(n_features=3, bins=3)
    assert not bins.learned and bins.dim == 1 + 3 * 2
    np.testing.assert_array_equal(bins.design([[1e9, -1e9, 0.0]]), [[1.0] + [0.0] * 6])


def test_edges_sit_at_each_features_quantiles_and_steps_count_the_edges_passed():
    contexts = np.column_stack([np.arange(1.0, 10.0), np.arange(1.0, 10.0) * 10])  # 9 rows
    bins = ContextBins.from_contexts(contexts, bins=3)
    assert bins.learned
    np.testing.assert_allclose(bins.edges, [[11 / 3, 19 / 3], [110 / 3, 190 / 3]])
    phi = bins.design([[1.0, 90.0], [5.0, 50.0]])
    # per feature: [x > q1, x > q2]
    np.testing.assert_array_equal(phi, [[1, 0, 0, 1, 1], [1, 1, 0, 1, 0]])
    assert bins.names(["a", "b"]) == ["intercept", "a>q1", "a>q2", "b>q1", "b>q2"]


def test_a_constant_feature_never_steps():
    bins = ContextBins.from_contexts(np.column_stack([np.ones(20), np.arange(20.0)]), bins=4)
    np.testing.assert_array_equal(bins.design([[1.0, 0.0]])[0, 1:4], [0, 0, 0])


@pytest.mark.parametrize("bins, contexts", [(1, [[0.0]]), (3, np.zeros((0, 2)))])
def test_too_few_bins_or_no_context_is_refused(bins, contexts):
    with pytest.raises(ValueError):
        ContextBins.from_contexts(contexts, bins)
