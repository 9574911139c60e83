import pickle

import numpy as np
import pytest
from scipy.special import chdtrc  # chi-square survival function; scipy.stats imports in ~2 s

from learners.replay import Column, PrioritizedReplayBuffer, SumTree, experience_columns

D = 3  # context features in these tests
COLUMNS = {
    "state": Column(np.dtype(np.int64)),  # the insertion order, so slots can be checked
    "action": Column(np.dtype(np.int16)),
    "reward": Column(np.dtype(np.float32)),
    "context": Column(np.dtype(np.float32), (D,)),
    "has_next": Column(np.dtype(np.bool_), (), False),
}


def make_buffer(capacity: int, alpha: float = 0.6, beta0: float = 0.4, beta_steps: int = 100_000,
                columns=None, **options) -> PrioritizedReplayBuffer:
    """A buffer with the paper's alpha and beta0 (also the shipped ones) unless a test sets them."""
    return PrioritizedReplayBuffer(capacity, COLUMNS if columns is None else columns, alpha, beta0, beta_steps,
                                   **options)


def chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's goodness-of-fit test, as scipy.stats.chisquare."""
    return chdtrc(len(observed) - 1, ((observed - expected) ** 2 / expected).sum())


def experiences(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """n experiences whose state is their insertion order and whose context row is [k, k+1, k+2]."""
    k = np.arange(start, start + n)
    return {"state": k, "action": k % 3, "reward": k / 10, "context": k[:, None] + np.arange(D)}


def service_experiences(n: int, d: int = 14) -> dict[str, np.ndarray]:
    """n experiences with every column of `experience_columns(d, 7)` but those with a default."""
    k = np.arange(n)
    return {"context": np.outer(k, np.ones(d)), "action": k % 7, "reward": k / n,
            "fold": k % 5, "propensity": np.full(n, 0.5), "policy_version": k // 4,
            "next_context": np.zeros((n, d))}


def test_sum_tree_search_matches_a_global_cumsum_and_never_returns_an_empty_leaf():
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    p[::7] = 0.0  # empty leaves inside blocks
    p[950:] = 0.0  # and a run of empty leaves at the end, as before the buffer fills
    tree = SumTree(1000, block_size=16)
    tree.update(np.arange(1000), p)
    values = np.sort(rng.random(20_000)) * tree.total
    expected = np.searchsorted(np.cumsum(p), values, side="right")
    np.testing.assert_array_equal(tree.find_prefix_sum(values), expected)
    edges = tree.find_prefix_sum(np.array([0.0, tree.total, tree.total * 1.01]))
    assert edges[0] == 1 and edges[1] == edges[2] == 949  # first and last non-empty leaves
    assert tree.total == pytest.approx(p.sum(), rel=1e-12)


def test_sum_tree_batched_updates_equal_a_rebuild_bit_for_bit():
    rng = np.random.default_rng(1)
    incremental, rebuilt = SumTree(300, block_size=8), SumTree(300, block_size=8)
    for _ in range(50):
        indices = rng.integers(0, 300, 20)  # with repeats: the last value wins
        incremental.update(indices, rng.random(20))
    rebuilt.update(np.arange(300), incremental.values.copy())
    np.testing.assert_array_equal(incremental._tree, rebuilt._tree)


def test_sampling_frequencies_follow_p_alpha_over_sum():
    alpha, td = 0.6, np.array([0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    buffer = make_buffer(capacity=8, alpha=alpha, eps=0.0, seed=0)
    buffer.add(experiences(8))
    buffer.update_priorities(np.arange(8), np.arange(8), td)
    counts = np.zeros(8)
    for _ in range(400):
        counts += np.bincount(buffer.sample(64).indices, minlength=8)
    n = counts.sum()
    assert chisquare_pvalue(counts, n * td**alpha / (td**alpha).sum()) > 0.01
    # The test can fail: frequencies proportional to |delta| (alpha ignored) are rejected.
    assert chisquare_pvalue(counts, n * td / td.sum()) < 1e-6


def test_stratified_sampling_draws_one_slot_per_equal_slice():
    buffer = make_buffer(capacity=8, alpha=1.0, eps=0.0, seed=7)
    buffer.add(experiences(8))  # equal priorities: slice i of the total is exactly slot i
    for _ in range(20):
        np.testing.assert_array_equal(buffer.sample(8).indices, np.arange(8))


def test_fifo_eviction_overwrites_the_oldest_first():
    buffer = make_buffer(capacity=4, seed=0)
    np.testing.assert_array_equal(buffer.add(experiences(3)), [0, 1, 2])
    np.testing.assert_array_equal(buffer.add(experiences(3, start=3)), [3, 0, 1])
    state = buffer.state_dict()
    np.testing.assert_array_equal(state["state"], [4, 5, 2, 3])
    np.testing.assert_array_equal(state["insertion_id"], [4, 5, 2, 3])
    assert len(buffer) == 4
    buffer.add(experiences(6, start=6))  # longer than the capacity: only the last 4 stay
    np.testing.assert_array_equal(buffer.state_dict()["state"], [8, 9, 10, 11])
    np.testing.assert_array_equal(buffer.state_dict()["context"][:, 0], [8, 9, 10, 11])


def test_new_experiences_get_the_max_priority_so_far():
    buffer = make_buffer(capacity=4, alpha=1.0, eps=0.0, seed=0)
    buffer.add(experiences(2))
    np.testing.assert_array_equal(buffer.state_dict()["priorities"][:2], [1.0, 1.0])  # p_1 = 1
    buffer.update_priorities([0, 1], [0, 1], [0.5, 7.0])
    slot = buffer.add(experiences(1, start=2))[0]
    assert buffer.state_dict()["priorities"][slot] == 7.0


def test_importance_weights_match_a_hand_computation():
    # eps = 0, alpha = 0.5: p = sqrt(|delta|) = [1, 2, 3, 4], P = p / 10 = [.1, .2, .3, .4], N = 4.
    buffer = make_buffer(capacity=4, alpha=0.5, beta0=0.5, beta_steps=2, eps=0.0, seed=1)
    buffer.add(experiences(4))
    buffer.update_priorities(np.arange(4), np.arange(4), [1.0, -4.0, 9.0, 16.0])
    # (N P)^-beta for beta = 0.5, e.g. (4 * 0.1)^-0.5 = 0.4^-0.5 = 1.58113883
    w_beta_050 = np.array([1.58113883, 1.11803399, 0.91287093, 0.79056942])
    # and for beta = 0.75 = 0.5 + (1 - 0.5) * 1/2, after one of beta_steps = 2 sample calls
    w_beta_075 = np.array([1.98817682, 1.18217701, 0.87219595, 0.70292666])
    for expected_beta, w in [(0.5, w_beta_050), (0.75, w_beta_075)]:
        assert buffer.beta == expected_beta
        sample = buffer.sample(4)
        np.testing.assert_allclose(sample.weights, w[sample.indices] / w[sample.indices].max(), rtol=1e-8)
    assert buffer.beta == 1.0
    buffer.sample(4)
    assert buffer.beta == 1.0


def test_sample_returns_the_stored_columns_with_their_dtypes_and_shapes():
    buffer = make_buffer(capacity=16, seed=2)
    buffer.add(experiences(10))
    sample = buffer.sample(5)
    assert sample.columns.keys() == COLUMNS.keys()
    for name, column in COLUMNS.items():
        assert sample.columns[name].dtype == column.dtype
        assert sample.columns[name].shape == (5, *column.shape)
    np.testing.assert_array_equal(sample.columns["state"], sample.insertion_ids)
    np.testing.assert_array_equal(sample.columns["action"], sample.columns["state"] % 3)
    assert sample.weights.max() == 1.0


def test_a_vector_column_round_trips_per_row():
    buffer = make_buffer(capacity=16, seed=3)
    rows = np.random.default_rng(3).normal(size=(10, D)).astype(np.float32)
    buffer.add({**experiences(10), "context": rows})
    sample = buffer.sample(32)
    np.testing.assert_array_equal(sample.columns["context"], rows[sample.columns["state"]])


def test_one_value_is_broadcast_to_every_experience():
    buffer = make_buffer(capacity=8, seed=4)
    buffer.add({**experiences(3), "context": [1.0, 2.0, 3.0], "action": 2})
    state = buffer.state_dict()
    np.testing.assert_array_equal(state["context"][:3], [[1, 2, 3]] * 3)
    np.testing.assert_array_equal(state["action"][:3], [2, 2, 2])


@pytest.mark.parametrize("omitted", ["has_next", "next_context", "search_rewards"])
def test_a_column_with_a_default_may_be_omitted(omitted):
    d, columns = 14, experience_columns(14, 7)
    buffer = make_buffer(capacity=8, columns=columns, seed=5)
    batch = {**service_experiences(3, d), "has_next": True}
    batch.pop(omitted, None)
    buffer.add(batch)
    stored = buffer.state_dict()[omitted][:3]
    np.testing.assert_array_equal(stored, np.full((3, *columns[omitted].shape), columns[omitted].default))


@pytest.mark.parametrize(("field", "value"), [
    ("context", np.zeros((3, D + 1))),  # a row of the wrong width
    ("context", np.zeros(D + 2)),  # one flat row of another width
    ("reward", [0.0, 1.0]),  # fewer experiences than the others
    ("reward", np.zeros((3, 2))),  # a vector for a scalar column
])
def test_a_field_of_the_wrong_shape_is_refused(field, value):
    buffer = make_buffer(capacity=8, seed=6)
    with pytest.raises(ValueError, match=field):
        buffer.add({**experiences(3), field: value})
    assert len(buffer) == 0


def test_missing_or_unknown_fields_are_refused():
    buffer = make_buffer(capacity=4)
    with pytest.raises(ValueError, match="missing fields.*'reward'"):
        buffer.add({"state": [1], "action": [0], "context": [[0.0] * D]})
    with pytest.raises(ValueError, match="unknown fields.*'extra'"):
        buffer.add({**experiences(1), "extra": [1]})
    assert len(buffer) == 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="empty"):
        make_buffer(capacity=4).sample(1)
    for bad in ({"capacity": 0}, {"capacity": 4, "alpha": -1.0}, {"capacity": 4, "beta0": 1.5},
                {"capacity": 4, "beta_steps": 0}):
        with pytest.raises(ValueError):
            make_buffer(**bad)


def test_stale_priority_updates_are_ignored():
    buffer = make_buffer(capacity=4, alpha=1.0, eps=0.0, seed=3)
    buffer.add(experiences(4))
    sample = buffer.sample(4)  # equal priorities, one per stratum: slots 0, 1, 2, 3
    np.testing.assert_array_equal(sample.indices, [0, 1, 2, 3])
    buffer.add(experiences(2, start=4))  # overwrites slots 0 and 1
    assert buffer.update_priorities(sample.indices, sample.insertion_ids, [9.0, 9.0, 9.0, 9.0]) == 2
    np.testing.assert_array_equal(buffer.state_dict()["priorities"], [1.0, 1.0, 9.0, 9.0])


@pytest.mark.parametrize(
    ("td_error", "eps", "problem"),
    [(np.nan, 1e-6, "non-finite"), (np.inf, 1e-6, "non-finite"), (0.0, 0.0, "zero")],
)
def test_bad_priorities_raise_and_change_nothing(td_error, eps, problem):
    buffer = make_buffer(capacity=4, eps=eps, seed=0)
    buffer.add(experiences(4))
    before = buffer.state_dict()["priorities"]
    with pytest.raises(ValueError, match=problem):
        buffer.update_priorities([0, 1], [0, 1], [0.5, td_error])
    np.testing.assert_array_equal(buffer.state_dict()["priorities"], before)


def test_state_dict_round_trip_is_exact():
    rng = np.random.default_rng(4)
    a = make_buffer(capacity=50, seed=5)
    a.add({**experiences(80), "context": rng.normal(size=(80, D))})
    sample = a.sample(16)
    a.update_priorities(sample.indices, sample.insertion_ids, rng.normal(size=16))
    b = make_buffer(capacity=50, seed=6)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    np.testing.assert_array_equal(a._tree._tree, b._tree._tree)
    x, y = a.sample(16), b.sample(16)
    for field in ("indices", "insertion_ids", "weights"):
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    for name in COLUMNS:
        np.testing.assert_array_equal(x.columns[name], y.columns[name])
    with pytest.raises(ValueError, match="capacity"):
        make_buffer(capacity=49).load_state_dict(state_a)


def test_ten_thousand_service_experiences_take_the_documented_bytes():
    d, columns = 14, experience_columns(14, 7)
    buffer = make_buffer(capacity=10_000, columns=columns)
    buffer.add(service_experiences(10_000, d))
    column_bytes = sum(c.dtype.itemsize * int(np.prod(c.shape)) for c in columns.values())
    assert column_bytes == 156  # as the module docstring says for 14 features and 7 actions
    assert 10_000 * (column_bytes + 8 + 2 * 8) <= buffer.nbytes < 1_900_000  # + insertion id, tree
