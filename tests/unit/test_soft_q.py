import pickle

import numpy as np
import pytest
from scipy.special import logsumexp

from learners.replay import NO_NEXT_STATE as END
from learners.soft_q import (
    QDelta,
    SoftQTable,
    Transitions,
    compute_deltas,
    policy_from_q,
    soft_value_from_q,
)

S0, S1, S, T, X, Y, Z, ODD, UNSEEN = range(9)  # state ids


def make_table(n_actions: int, tau: float = 0.1, lr: float = 0.001, gamma: float = 0.0,
               prior_count: float = 200.0) -> SoftQTable:
    """A table with the shipped hyperparameters (configs/settings.yaml) unless a test sets them."""
    return SoftQTable(n_actions, tau, lr, gamma, prior_count)


def policy(table: SoftQTable, state: int) -> np.ndarray:
    return policy_from_q(table.q_values(state), table.tau)


def set_table(table: SoftQTable, pooled, means: dict, pooled_weight=None, weights=None) -> None:
    """Put the table at given b, m and n by applying one delta to an empty table."""
    states = tuple(means)
    n = table.n_actions
    table.apply_deltas(QDelta(
        states=states,
        means=np.array([means[s] for s in states], float).reshape(len(states), n),
        weight=np.array([(weights or {}).get(s, [0.0] * n) for s in states], float).reshape(len(states), n),
        pooled=np.array(pooled, float),
        pooled_weight=np.array(pooled_weight if pooled_weight is not None else [0.0] * n, float),
        base_version=0,
    ))


def test_update_matches_a_hand_computed_pooled_soft_q_step():
    table = make_table(n_actions=3, tau=0.5, lr=0.1, gamma=0.9, prior_count=2.0)
    set_table(table, pooled=[1.0, 0.0, -1.0], pooled_weight=[0.0, 0.0, 3.2],
              means={S0: [0.0, 0.0, 0.1]}, weights={S0: [0.0, 0.0, 1.2]})
    # s1 never seen: Q(s1) = b = [1, 0, -1]; V(s1) = tau * log(e^2 + e^0 + e^-2)
    #   = 0.5 * log(8.524391) = 1.0714658
    assert soft_value_from_q(table.q_values(S1), table.tau) == pytest.approx(1.0714658142, abs=1e-9)
    # Q(s0, 2) = (n * m + k * b) / (n + k) = (1.2 * 0.1 + 2 * -1) / 3.2 = -0.5875
    np.testing.assert_allclose(table.q_values(S0), [1.0, 0.0, -0.5875])  # n = 0: Q = b
    # y = r + gamma * V(s1) = 0.5 + 0.9 * 1.0714658 = 1.4643192
    # b(2):    eta = max(0.1, 0.8 / (3.2 + 0.8)) = 0.2; += 0.2 * (1.4643192 + 1) = 0.4928638
    # m(s0,2): eta = max(0.1, 0.8 / (1.2 + 0.8)) = 0.4; += 0.4 * (1.4643192 - 0.1) = 0.5457277
    # Q(s0, 2) = (2.0 * 0.6457277 + 2 * -0.5071362) / 4 = 0.0692958
    delta, td = table.update(Transitions([S0], [2], [0.5], [S1]), weights=[0.8])
    assert td[0] == pytest.approx(1.4643192328 + 0.5875, abs=1e-9)
    assert delta.states == (S0,) and delta.base_version == 1
    np.testing.assert_allclose(delta.pooled, [0.0, 0.0, 0.4928638466], atol=1e-9)
    np.testing.assert_allclose(delta.means, [[0.0, 0.0, 0.5457276931]], atol=1e-9)
    assert table.q_values(S0)[2] == pytest.approx(0.0692958, abs=1e-7)
    np.testing.assert_allclose(table.snapshot().weights([S0]), [[0.0, 0.0, 2.0]])
    np.testing.assert_allclose(table.snapshot().pooled_weight, [0.0, 0.0, 4.0])
    assert table.version == 2


def test_steps_average_every_sample_then_settle_at_lr():
    table = make_table(n_actions=2, lr=0.2, gamma=0.0, prior_count=0.0)
    for r in (1.0, 0.0, 0.5):  # 1/n steps: the running mean
        table.update(Transitions([S], [1], [r], [END]))
    assert table.snapshot().pooled[1] == pytest.approx(0.5)
    assert table.q_values(S)[1] == pytest.approx(0.5)
    table.update(Transitions([S], [1], [1.0], [END]))  # 1/4 > 0.2: still the mean
    table.update(Transitions([S], [1], [1.0], [END]))  # 1/5 = 0.2
    before = table.q_values(S)[1]
    table.update(Transitions([S], [1], [0.0], [END]))  # 1/6 < 0.2: the step stays at lr
    assert table.q_values(S)[1] == pytest.approx(before - 0.2 * before)


def test_with_k_0_the_update_is_the_classic_one_once_steps_reach_lr():
    table = make_table(n_actions=2, tau=0.5, lr=0.5, gamma=0.0, prior_count=0.0)
    for expected in (1.0, 0.5, 0.75):  # Q += max(lr, 1/n) * (r - Q): 1/1, then lr 0.5
        table.update(Transitions([S], [1], [1.0 if expected != 0.5 else 0.0], [END]))
        assert table.q_values(S)[1] == pytest.approx(expected)
    _, td = compute_deltas(table.snapshot(), Transitions([S], [1], [1.0], [END]), [1.0], 0.5, 0.0, 0.5)
    assert td[0] == pytest.approx(0.25)  # y - Q = 1 - 0.75


def test_a_state_departs_from_the_pooled_row_only_as_its_evidence_outweighs_the_prior():
    table = make_table(n_actions=2, lr=1e-4, gamma=0.0, prior_count=10.0)
    # Everywhere action 0 earns 0.6 and action 1 earns 0.5, except in ODD, where 1 earns 0.9.
    for state in (X, Y):
        for _ in range(100):
            table.update(Transitions([state, state], [0, 1], [0.6, 0.5], [END, END]))
    assert np.argmax(policy(table, UNSEEN)) == 0
    table.update(Transitions([ODD, ODD], [0, 1], [0.6, 0.9], [END, END]))
    q = table.q_values(ODD)
    assert q[1] < q[0]  # one sample does not outweigh a prior of ten
    assert q[1] == pytest.approx((1 * 0.9 + 10 * table.snapshot().pooled[1]) / 11)
    for _ in range(19):
        table.update(Transitions([ODD, ODD], [0, 1], [0.6, 0.9], [END, END]))
    assert np.argmax(policy(table, ODD)) == 1  # twenty do
    assert np.argmax(policy(table, X)) == 0 and np.argmax(policy(table, UNSEEN)) == 0


def test_soft_value_is_tau_logsumexp_and_stable():
    q = np.array([[1000.0, 999.0, -500.0], [0.1, 0.2, 0.3], [-800.0, -800.0, -800.0]])
    for tau in (0.01, 0.1, 1.0, 10.0):
        np.testing.assert_allclose(soft_value_from_q(q, tau), tau * logsumexp(q / tau, axis=1))
        pi = policy_from_q(q, tau)
        assert np.isfinite(pi).all()
        np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    assert soft_value_from_q(q[1], 1e-4) == pytest.approx(0.3)  # -> max_a Q as tau -> 0


def test_policy_is_softmax_and_an_unseen_state_takes_the_pooled_row():
    table = make_table(n_actions=3, tau=0.5)
    np.testing.assert_allclose(policy(table, UNSEEN), [1 / 3] * 3)
    set_table(table, pooled=[0.5, 0.0, 0.0], means={S: [1.0, 0.0, -1.0]}, weights={S: [1e6] * 3})
    # lr 0.001: n counts as 1000, k = 200: Q(s) = (1000 * [1, 0, -1] + 200 * [0.5, 0, 0]) / 1200
    np.testing.assert_allclose(table.q_values(S), [1100 / 1200, 0.0, -1000 / 1200])
    table = make_table(n_actions=3, tau=0.5, prior_count=0.0)
    set_table(table, pooled=[0.5, 0.0, 0.0], means={S: [1.0, 0.0, -1.0]}, weights={S: [1.0] * 3})
    # Q(s) = m(s) = [1, 0, -1]; e^(Q/tau) = [e^2, 1, e^-2] / 8.524391
    np.testing.assert_allclose(policy(table, S), [0.86681333, 0.11731043, 0.01587624], atol=1e-8)
    np.testing.assert_allclose(policy(table, UNSEEN), policy_from_q(np.array([0.5, 0.0, 0.0]), 0.5))


def test_repeated_cells_in_a_batch_take_one_weighted_mean_step():
    table = make_table(n_actions=2, tau=1.0, lr=0.01, gamma=0.0, prior_count=1.0)
    batch = Transitions([S, S, S, T], [1, 1, 0, 1], [1.0, 0.4, 0.2, 0.4], [END] * 4)
    delta, td = compute_deltas(table.snapshot(), batch, [1.0, 0.5, 1.0, 2.0], tau=1.0, gamma=0.0, lr=0.01)
    np.testing.assert_allclose(td, [1.0, 0.4, 0.2, 0.4])  # all against Q = 0
    # From nothing each cell steps to its w-weighted mean target (eta = W / (0 + W) = 1):
    # b(0) = 0.2; b(1) = (1 * 1.0 + 0.5 * 0.4 + 2 * 0.4) / 3.5 = 4/7
    np.testing.assert_allclose(delta.pooled, [0.2, 4 / 7])
    np.testing.assert_allclose(delta.pooled_weight, [1.0, 3.5])
    # m(s,1) = (1 * 1.0 + 0.5 * 0.4) / 1.5 = 0.8; m(s,0) = 0.2; m(t,1) = 0.4
    assert delta.states == (S, T)
    np.testing.assert_allclose(delta.means, [[0.2, 0.8], [0.0, 0.4]])
    np.testing.assert_allclose(delta.weight, [[1.0, 1.5], [0.0, 2.0]])
    table.apply_deltas(delta)
    # Q(s,1) = (1.5 * 0.8 + 1 * 4/7) / 2.5
    assert table.q_values(S)[1] == pytest.approx((1.2 + 4 / 7) / 2.5)


def test_many_repeats_of_one_cell_converge_instead_of_diverging():
    table = make_table(n_actions=2, lr=0.5, gamma=0.0)
    batch = Transitions([S] * 32, [0] * 32, [1.0] * 32, [END] * 32)
    for _ in range(30):
        table.update(batch)
    assert table.q_values(S)[0] == pytest.approx(1.0, abs=1e-6)


def test_compute_deltas_is_pure_and_snapshots_stay_unchanged():
    table = make_table(n_actions=2, lr=0.5)
    snapshot = table.snapshot()
    batch = Transitions([S], [0], [1.0], [END])
    delta, _ = compute_deltas(snapshot, batch, [1.0], tau=table.tau, gamma=table.gamma, lr=table.lr)
    assert table.version == 0 and table.q_values(S)[0] == 0.0
    assert table.apply_deltas(delta) == 1
    assert table.q_values(S)[0] == 1.0
    assert table.apply_deltas(delta) == 2  # a stale delta is still applied
    assert snapshot.version == 0 and snapshot.values([S])[0, 0] == 0.0
    with pytest.raises(ValueError):
        table.snapshot().means[0, 0] = 5.0  # read-only
    with pytest.raises(ValueError):
        table.snapshot().pooled[0] = 5.0
    with pytest.raises(ValueError, match="actions"):
        table.update(Transitions([S], [2], [1.0], [END]))


def test_bad_hyperparameters_are_refused():
    for bad in ({"tau": 0.0}, {"lr": 0.0}, {"lr": 1.5}, {"gamma": 1.1}, {"prior_count": -1.0}):
        with pytest.raises(ValueError, match="need"):
            make_table(n_actions=2, **bad)


def test_state_dict_round_trip():
    a = make_table(n_actions=3, tau=0.2, lr=0.3, gamma=0.5, prior_count=4.0)
    a.update(
        Transitions([X, Y, X], [0, 2, 1], [1.0, 0.5, 0.2], [Y, END, X]), [1.0, 0.5, 2.0]
    )
    b = make_table(n_actions=3)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert (b.tau, b.lr, b.gamma, b.prior_count, b.version) == (a.tau, a.lr, a.gamma, a.prior_count, a.version)
    for state in (X, Y, Z):
        np.testing.assert_array_equal(a.q_values(state), b.q_values(state))
    np.testing.assert_array_equal(a.snapshot().weights([X]), b.snapshot().weights([X]))
    with pytest.raises(ValueError, match="actions"):
        make_table(n_actions=2).load_state_dict(a.state_dict())
    old_layout = {k: v for k, v in a.state_dict().items() if k != "format"}
    with pytest.raises(ValueError, match="layout 1,"):
        make_table(n_actions=3).load_state_dict(old_layout)
