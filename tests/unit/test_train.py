import collections

import httpx
import numpy as np
import pytest

from cluster.clients.train import MAX_JUDGEMENTS, SeedRun, Snapshot, TrainingError, _call, _judgements
from cluster.data.beir import split_half
from learners import policy_scores  # TestMatrix by module: pytest would try to collect a Test* name
from learners.policy_scores import fixed, greedy, outcome, paired_bootstrap, queries_needed, served
from learners.value_model import ValueSnapshot

# 2 queries x 3 actions: action 0 is lexical (no dense side, no cost)
MATRIX = policy_scores.TestMatrix(
    query_ids=["q1", "q2"],
    contexts=np.array([[1.0], [-1.0]]),
    quality=np.array([[0.2, 0.6, 0.4], [0.8, 0.2, 0.4]]),
    cost=np.array([[0.0, 10.0, 20.0], [0.0, 5.0, 15.0]]),
    dense=np.array([False, True, True]),
)


def policy(open_actions: tuple[int, ...] = (0, 1, 2), epsilon: float = 0.0) -> ValueSnapshot:
    """Q(x, .) = [0, x, -x]: action 1 where x > 0, action 2 where x < 0; the pooled row picks 0."""
    theta = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    return ValueSnapshot(3, theta, np.array([0.1, 0.0, 0.0]), np.full(3, 100.0), (), 0, 0.0, open_actions, epsilon, 0.5)


def test_split_half_is_disjoint_complete_and_depends_on_ids_and_seed_only():
    ids = [str(i) for i in range(11)]
    train, test = split_half(ids, seed=3)
    assert (len(train), len(test)) == (5, 6)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(ids)
    assert split_half(list(reversed(ids)), seed=3) == (train, test)
    assert split_half(ids, seed=4) != (train, test)


def test_outcome_is_the_expectation_under_the_probabilities():
    probabilities = np.array([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    result = outcome(MATRIX, probabilities, cost_weight=0.01)
    np.testing.assert_allclose(result.quality, [0.4, 0.05 + 0.3])
    np.testing.assert_allclose(result.cost, [5.0, 1.25 + 11.25])
    np.testing.assert_allclose(result.dense, [0.5, 1.0])
    np.testing.assert_allclose(result.reward, [0.4 - 0.05, 0.35 - 0.125])


def test_fixed_takes_one_action_on_every_query():
    probabilities = fixed(MATRIX, 1)
    assert probabilities.shape == (2, 3)
    np.testing.assert_array_equal(probabilities, [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_allclose(outcome(MATRIX, probabilities, 0.0).quality, MATRIX.quality[:, 1])


def test_greedy_follows_the_context_only_when_the_gate_is_open():
    np.testing.assert_array_equal(greedy(MATRIX, policy()), [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(greedy(MATRIX, policy(open_actions=())), [[1, 0, 0], [1, 0, 0]])


def test_served_includes_exploration():
    probabilities = served(MATRIX, policy(epsilon=0.2))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities > 0).all() and (probabilities.max(axis=1) > 0.8).all()
    np.testing.assert_array_equal(probabilities.argmax(axis=1), [1, 2])
    np.testing.assert_array_equal(served(MATRIX, policy(epsilon=0.0)), greedy(MATRIX, policy()))


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for seed in range(200):
        values = rng.normal(0.3, 1.0, 100)
        interval = paired_bootstrap(values, resamples=500, seed=seed)
        assert interval.low < interval.lower_95 < interval.mean < interval.high
        assert interval.mean == pytest.approx(values.mean())
        hits += interval.low <= 0.3 <= interval.high
        widths.append(interval.high - interval.low)
    assert 0.89 <= hits / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 1.0 / np.sqrt(100), rel=0.1)


def test_paired_differences_give_a_narrower_interval_than_unpaired_means():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0.5, 0.3, 300)  # shared by both policies on a query
    a = difficulty + 0.05 + rng.normal(0, 0.05, 300)
    b = difficulty + rng.normal(0, 0.05, 300)
    paired = paired_bootstrap(a - b)
    width_a, width_b = (paired_bootstrap(v).high - paired_bootstrap(v).low for v in (a, b))
    assert paired.high - paired.low < np.hypot(width_a, width_b) / 3
    assert paired.low > 0  # the paired comparison sees the 0.05 gain


def test_a_query_repeated_across_seeds_counts_as_one_cluster():
    rng = np.random.default_rng(2)
    values = rng.normal(0.1, 0.5, 60)
    names = [f"q{i}" for i in range(60)]
    once = paired_bootstrap(values, names)
    repeated = paired_bootstrap(np.tile(values, 5), names * 5)  # five seeds, each query identical
    assert (repeated.low, repeated.high) == pytest.approx((once.low, once.high))
    # The test can fail: the same rows taken as 300 independent queries give a much narrower interval.
    naive = paired_bootstrap(np.tile(values, 5))
    assert naive.high - naive.low < (once.high - once.low) / 1.8


def test_queries_needed_for_80_percent_power_at_5_percent():
    differences = np.array([0.1, 0.3, -0.1, 0.5])  # mean 0.2, sample variance 0.2 / 3
    z = 1.959963984540054 + 0.8416212335729143
    assert queries_needed(differences) == pytest.approx(z**2 * (0.2 / 3) / 0.2**2)
    assert queries_needed(differences, effect=0.1) == pytest.approx(4 * queries_needed(differences))
    assert queries_needed(np.array([0.2, -0.2])) == float("inf")


def test_judgements_keep_every_qrel_when_they_fit():
    assert _judgements({"b": 1.0, "a": 2.0, "c": 0.0}) == ({"a": 2, "b": 1, "c": 0}, False)
    exactly = {f"d{i}": 1.0 for i in range(MAX_JUDGEMENTS)}
    judgements, trimmed = _judgements(exactly)
    assert len(judgements) == MAX_JUDGEMENTS and not trimmed


def test_judgements_are_trimmed_to_the_highest_grades_and_flagged():
    qrels = {f"d{i:04d}": float(i % 4) for i in range(1200)}  # 300 documents of each grade 0..3
    judgements, trimmed = _judgements(qrels)
    assert trimmed and len(judgements) == MAX_JUDGEMENTS == 1000
    assert collections.Counter(judgements.values()) == {3: 300, 2: 300, 1: 300, 0: 100}
    assert all(isinstance(grade, int) for grade in judgements.values())
    assert {doc for doc, grade in judgements.items() if grade == 0} == {f"d{i:04d}" for i in range(0, 400, 4)}


def seed_run(judged: list[int], quality: list[list[float]], rewards: list[list[float]]) -> SeedRun:
    snapshots = [Snapshot(j, policy(), {"policy_version": j}) for j in judged]
    return SeedRun(0, "test", MATRIX, snapshots, quality, rewards, collections.Counter(), collections.Counter(), 0)


def test_snapshot_at_is_the_first_taken_once_enough_queries_were_judged():
    run = seed_run([0, 100, 200, 500, 1000], [], [])
    assert [run.snapshot_at(j).judged for j in (0, 1, 150, 200, 201, 1000, 5000)] == [0, 100, 200, 200, 500, 1000, 1000]


def test_best_fixed_is_the_best_mean_over_the_first_judged_queries():
    quality = [[0.9, 0.1, 0.5], [0.1, 0.9, 0.6], [0.1, 0.9, 0.6], [0.1, 0.9, 0.6]]
    rewards = [[0.9, 0.1, 0.5], [0.1, 0.2, 0.6], [0.1, 0.2, 0.6], [0.1, 0.2, 0.6]]
    run = seed_run([0, 4], quality, rewards)
    assert run.best_fixed(1, by_reward=False) == 0  # only the first query counts
    assert run.best_fixed(4, by_reward=False) == 1
    assert run.best_fixed(4, by_reward=True) == 2  # action 1's quality costs too much


def flaky_service(unavailable: int) -> tuple[httpx.AsyncClient, list[int]]:
    """A service answering 503 (the learning state loading) `unavailable` times, then 200."""
    codes: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        code = 503 if len(codes) < unavailable else 200
        codes.append(code)
        return httpx.Response(code, json={"error": "service_unavailable"} if code == 503 else {"ok": True})

    return httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://service"), codes


async def test_a_503_is_retried_until_the_service_is_up():
    client, codes = flaky_service(unavailable=2)
    async with client:
        assert await _call(client, "POST", "/api/v1/admin/learning/reset") == {"ok": True}
    assert codes == [503, 503, 200]


async def test_a_503_past_the_wait_ends_the_run_with_the_services_answer():
    client, codes = flaky_service(unavailable=10**6)
    async with client:
        with pytest.raises(TrainingError, match="HTTP 503.*service_unavailable"):
            await _call(client, "POST", "/api/v1/admin/learning/reset", unavailable_s=0.0)
    assert codes == [503]
