import math

import numpy as np
import pytest

from cluster.data.beir import split_half
from learners.policy_scores import expected_ndcg, greedy_actions, mean_ndcg, oracle_actions

# 4 queries x 3 actions; queries 0 and 1 share state "a", 2 and 3 share "b"
SCORES = np.array([
    [0.2, 0.6, 0.4],
    [0.8, 0.2, 0.4],
    [0.0, 1.0, 0.5],
    [0.0, 0.0, 0.5],
])
STATES = ["a", "a", "b", "b"]


def test_split_half_is_disjoint_complete_and_depends_on_ids_and_seed_only():
    ids = [str(i) for i in range(11)]
    train, test = split_half(ids, seed=3)
    assert (len(train), len(test)) == (5, 6)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(ids)
    assert split_half(list(reversed(ids)), seed=3) == (train, test)
    assert split_half(ids, seed=4) != (train, test)


def test_greedy_takes_argmax_first_on_ties_and_the_pooled_row_for_unseen_states():
    q_table = {"a": [0.1, 0.3, 0.2], "b": [0.5, 0.0, 0.5]}
    actions = greedy_actions(["a", "b", "zzz"], q_table, pooled=[0.0, 0.1, 0.2])
    assert actions.tolist() == [1, 0, 2]


def test_mean_ndcg_of_a_deterministic_policy():
    assert mean_ndcg(SCORES, np.array([1, 0, 1, 2])) == pytest.approx((0.6 + 0.8 + 1.0 + 0.5) / 4)


def test_expected_ndcg_under_softmax_and_the_pooled_row_for_unseen_states():
    tau = 0.5
    q_table = {"a": [0.0, math.log(3) * tau, 0.0]}  # softmax: 1/5, 3/5, 1/5
    expected_a = [0.2 * 0.2 + 0.6 * 0.6 + 0.2 * 0.4, 0.2 * 0.8 + 0.6 * 0.2 + 0.2 * 0.4]
    expected_b = [(0.0 + 1.0 + 0.5) / 3, 0.5 / 3]  # "b" unseen: the pooled row, here uniform
    assert expected_ndcg(SCORES, STATES, q_table, [0.3, 0.3, 0.3], tau) == pytest.approx(
        (sum(expected_a) + sum(expected_b)) / 4
    )


def test_expected_ndcg_approaches_greedy_as_tau_shrinks():
    q_table = {"a": [0.0, 1.0, 0.5], "b": [0.2, 0.1, 0.0]}
    greedy = mean_ndcg(SCORES, greedy_actions(STATES, q_table, [0.0, 0.0, 0.0]))
    assert expected_ndcg(SCORES, STATES, q_table, [0.0, 0.0, 0.0], 1e-4) == pytest.approx(greedy)


def test_oracle_picks_per_state_the_best_mean_not_per_query():
    # state a: means 0.5, 0.4, 0.4 -> action 0; state b: 0.0, 0.5, 0.5 -> action 1 (first tie)
    actions = oracle_actions(SCORES, STATES)
    assert actions.tolist() == [0, 0, 1, 1]
    assert mean_ndcg(SCORES, actions) == pytest.approx((0.2 + 0.8 + 1.0 + 0.0) / 4)


def test_oracle_bounds_every_state_policy():
    oracle = mean_ndcg(SCORES, oracle_actions(SCORES, STATES))
    for a in range(3):
        for b in range(3):
            q_table = {"a": np.eye(3)[a].tolist(), "b": np.eye(3)[b].tolist()}
            assert mean_ndcg(SCORES, greedy_actions(STATES, q_table, [0.0, 0.0, 0.0])) <= oracle + 1e-12
