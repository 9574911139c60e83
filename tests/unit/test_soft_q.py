import pickle

import numpy as np
import pytest
from scipy.special import logsumexp

from learners.soft_q import (
    QDelta,
    SoftQTable,
    Transitions,
    compute_deltas,
    policy_from_q,
    soft_value_from_q,
)


def test_update_matches_a_hand_computed_soft_q_step():
    table = SoftQTable(n_actions=3, tau=0.5, lr=0.1, gamma=0.9, seed=0)
    table.apply_deltas(QDelta(("s1",), np.array([[1.0, 0.0, -1.0]]), base_version=0))
    # V(s1) = tau * log(e^(1/0.5) + e^0 + e^(-1/0.5)) = 0.5 * log(7.389056 + 1 + 0.135335)
    #       = 0.5 * log(8.524391) = 0.5 * 2.1429316 = 1.0714658
    assert table.soft_value("s1") == pytest.approx(1.0714658142, abs=1e-9)
    # delta = r + gamma * V(s1) - Q(s0, 2) = 0.5 + 0.9 * 1.0714658 - 0 = 1.4643192
    # Q(s0, 2) += lr * w * delta = 0.1 * 0.8 * 1.4643192 = 0.1171455
    delta, td = table.update(Transitions(["s0"], [2], [0.5], ["s1"]), weights=[0.8])
    assert td[0] == pytest.approx(1.4643192328, abs=1e-9)
    assert delta.states == ("s0",) and delta.base_version == 1
    np.testing.assert_allclose(table.q_values("s0"), [0.0, 0.0, 0.1171455386], atol=1e-9)
    np.testing.assert_allclose(table.q_values("s1"), [1.0, 0.0, -1.0])
    assert table.version == 2


def test_bandit_case_moves_q_towards_the_reward():
    table = SoftQTable(n_actions=2, lr=0.5, gamma=0.0)
    for expected in (0.5, 0.75, 0.875):  # Q += 0.5 * (1 - Q), from 0
        table.update(Transitions(["s"], [1], [1.0], [None]))
        assert table.q_values("s")[1] == pytest.approx(expected)
    assert table.td_error("s", 1, 1.0, None) == pytest.approx(0.125)


def test_soft_value_is_tau_logsumexp_and_stable():
    q = np.array([[1000.0, 999.0, -500.0], [0.1, 0.2, 0.3], [-800.0, -800.0, -800.0]])
    for tau in (0.01, 0.1, 1.0, 10.0):
        np.testing.assert_allclose(soft_value_from_q(q, tau), tau * logsumexp(q / tau, axis=1))
        pi = policy_from_q(q, tau)
        assert np.isfinite(pi).all()
        np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    assert soft_value_from_q(q[1], 1e-4) == pytest.approx(0.3)  # -> max_a Q as tau -> 0


def test_policy_is_softmax_and_uniform_for_unseen_states():
    table = SoftQTable(n_actions=3, tau=0.5)
    np.testing.assert_allclose(table.policy("never seen"), [1 / 3] * 3)
    table.apply_deltas(QDelta(("s",), np.array([[1.0, 0.0, -1.0]]), base_version=0))
    # e^(Q/tau) = [e^2, 1, e^-2] / 8.524391
    np.testing.assert_allclose(table.policy("s"), [0.86681333, 0.11731043, 0.01587624], atol=1e-8)


def test_propensity_is_the_policy_probability_of_the_action_and_acting_is_seeded():
    a, b = SoftQTable(n_actions=4, tau=0.3, seed=7), SoftQTable(n_actions=4, tau=0.3, seed=7)
    for table in (a, b):
        table.apply_deltas(QDelta(("s",), np.array([[0.5, 0.1, 0.0, 0.3]]), base_version=0))
    actions = []
    for _ in range(50):
        action, propensity = a.act("s")
        assert propensity == a.policy("s")[action]
        actions.append(action)
    assert actions == [b.act("s")[0] for _ in range(50)]
    assert len(set(actions)) > 1
    rng = np.random.default_rng(1)
    assert a.act("s", rng)[0] == b.act("s", np.random.default_rng(1))[0]


def test_repeated_state_action_pairs_in_a_batch_take_one_averaged_step():
    table = SoftQTable(n_actions=2, tau=1.0, lr=0.1, gamma=0.0)
    batch = Transitions(["s", "s", "s", "t"], [1, 1, 0, 1], [1.0, 1.0, 0.2, 0.4], [None] * 4)
    delta, td = compute_deltas(
        table.snapshot(), batch, [1.0, 0.5, 1.0, 2.0], tau=1.0, gamma=0.0, lr=0.1
    )
    # All against Q = 0, so delta = r:
    # Q(s,1) += 0.1 * (1 * 1.0 + 0.5 * 1.0) / 2, Q(s,0) += 0.1 * 0.2, Q(t,1) += 0.1 * 2 * 0.4
    np.testing.assert_allclose(td, [1.0, 1.0, 0.2, 0.4])
    assert delta.states == ("s", "t")
    np.testing.assert_allclose(delta.values, [[0.02, 0.075], [0.0, 0.08]])


def test_many_repeats_of_one_pair_converge_instead_of_diverging():
    table = SoftQTable(n_actions=2, lr=0.5, gamma=0.0)
    batch = Transitions(["s"] * 32, [0] * 32, [1.0] * 32, [None] * 32)
    for _ in range(30):
        table.update(batch)
    assert table.q_values("s")[0] == pytest.approx(1.0, abs=1e-6)


def test_compute_deltas_is_pure_and_snapshots_stay_unchanged():
    table = SoftQTable(n_actions=2, lr=0.5)
    snapshot = table.snapshot()
    batch = Transitions(["s"], [0], [1.0], [None])
    delta, _ = compute_deltas(snapshot, batch, [1.0], tau=table.tau, gamma=table.gamma, lr=table.lr)
    assert table.version == 0 and table.q_values("s")[0] == 0.0
    assert table.apply_deltas(delta) == 1
    assert table.apply_deltas(delta) == 2  # a stale delta is still applied
    assert table.q_values("s")[0] == 1.0
    assert snapshot.version == 0 and snapshot.values(["s"])[0, 0] == 0.0
    with pytest.raises(ValueError):
        table.snapshot().q[0, 0] = 5.0  # read-only
    with pytest.raises(ValueError, match="actions"):
        table.update(Transitions(["s"], [2], [1.0], [None]))


def test_state_dict_round_trip():
    a = SoftQTable(n_actions=3, tau=0.2, lr=0.3, gamma=0.5, seed=1)
    a.update(
        Transitions(["x", "y", "x"], [0, 2, 1], [1.0, 0.5, 0.2], ["y", None, "x"]), [1.0, 0.5, 2.0]
    )
    a.act("x")
    b = SoftQTable(n_actions=3, seed=99)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert (b.tau, b.lr, b.gamma, b.version) == (a.tau, a.lr, a.gamma, a.version)
    for state in ("x", "y", "z"):
        np.testing.assert_array_equal(a.q_values(state), b.q_values(state))
    assert [a.act("x") for _ in range(20)] == [b.act("x") for _ in range(20)]
    with pytest.raises(ValueError):
        SoftQTable(n_actions=2).load_state_dict(a.state_dict())
