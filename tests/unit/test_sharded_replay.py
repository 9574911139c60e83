"""Sharded prioritized replay samples as one buffer holding the same experiences would."""

import numpy as np
import pytest
from scipy.special import chdtrc
from test_replay import COLUMNS, chisquare_pvalue, experiences, make_buffer

from learners.replay import PrioritizedReplayBuffer
from learners.sharded_replay import ShardedReplay, multinomial_split, stratified_split

K = 60  # experiences, their `state` column numbering them 0..K-1
SIZES = {1: [K], 2: [15, 45], 4: [5, 10, 15, 30]}  # uneven, so the shards' masses differ
DRAWS = 3000  # batches of 32: about 400 expected draws of the least likely experience


def td_errors() -> np.ndarray:
    return np.random.default_rng(7).uniform(0.1, 3.0, K)


def unsharded() -> PrioritizedReplayBuffer:
    buffer = make_buffer(K, seed=1)
    slots = buffer.add(experiences(K))
    buffer.update_priorities(slots, slots, td_errors())
    return buffer


def sharded(sizes: list[int], split=multinomial_split, seed: int = 2) -> ShardedReplay:
    """The K experiences over len(sizes) shards in order, with the same TD errors as `unsharded`."""
    starts = np.cumsum([0, *sizes])
    shards = []
    for s, (start, size) in enumerate(zip(starts, sizes)):
        shard = make_buffer(size, seed=100 + s)
        slots = shard.add(experiences(size, start))
        shard.update_priorities(slots, slots, td_errors()[start:start + size])
        shards.append(shard)
    return ShardedReplay(shards, split, seed=seed)


def equal_split(masses: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """The wrong split: B / N per shard whatever its mass."""
    counts = np.full(len(masses), batch_size // len(masses))
    counts[: batch_size - counts.sum()] += 1
    return counts


def flattened_split(masses: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A subtly wrong split: by m_s^0.9, as if one stage forgot a bit of alpha."""
    return rng.multinomial(batch_size, masses**0.9 / (masses**0.9).sum())


def draw_counts(replay, batches: int = DRAWS, batch_size: int = 32) -> np.ndarray:
    """How often each experience (by `state`) is drawn over `batches` samples, shape (K,)."""
    states = np.concatenate([replay.sample(batch_size).columns["state"] for _ in range(batches)])
    return np.bincount(states, minlength=K)


def two_sample_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test of homogeneity of two count vectors (a 2 x K contingency table)."""
    table = np.stack([a, b]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return chdtrc(table.shape[1] - 1, ((table - expected) ** 2 / expected).sum())


# Stratified draws (within a shard, and in the unsharded buffer) are less dispersed than independent
# ones, so these tests are conservative; the subtly wrong split shows they keep their power.
@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, np.ndarray]:
    """The unsharded buffer's P(i) and its empirical draw counts."""
    buffer = unsharded()
    return buffer.priorities / buffer.priority_mass, draw_counts(buffer)


@pytest.mark.parametrize("split", [multinomial_split, stratified_split])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_sampling_distribution_matches_an_unsharded_buffer(reference, num_shards, split):
    probabilities, unsharded_counts = reference
    counts = draw_counts(sharded(SIZES[num_shards], split))
    assert chisquare_pvalue(unsharded_counts, probabilities * unsharded_counts.sum()) > 1e-3  # the test's control
    assert chisquare_pvalue(counts, probabilities * counts.sum()) > 1e-3
    assert two_sample_pvalue(counts, unsharded_counts) > 1e-3


@pytest.mark.parametrize("split", [equal_split, flattened_split])
@pytest.mark.parametrize("num_shards", [2, 4])
def test_a_split_not_by_priority_mass_is_rejected(reference, num_shards, split):
    probabilities, unsharded_counts = reference
    counts = draw_counts(sharded(SIZES[num_shards], split))
    assert chisquare_pvalue(counts, probabilities * counts.sum()) < 1e-6
    assert two_sample_pvalue(counts, unsharded_counts) < 1e-6


def test_weights_are_the_unsharded_buffers_against_the_global_distribution():
    buffer, replay = unsharded(), sharded(SIZES[4])
    for _ in range(5):  # beta anneals alike in both
        buffer.sample(32), replay.sample(32)
    assert replay.beta == buffer.beta and 0.4 < replay.beta < 1.0
    batch = replay.sample(256)
    assert len(np.unique(batch.shards)) == 4
    # w_i = (N_total P(i))^-beta / max_j, P(i) = p_i / M over all shards, from the unsharded buffer
    global_p = buffer.priorities[batch.columns["state"]] / buffer.priority_mass
    expected = (len(buffer) * global_p) ** -buffer.beta
    np.testing.assert_allclose(batch.weights, expected / expected.max(), rtol=1e-12)
    assert batch.weights.max() == 1.0
    # each shard normalising its own part of the batch, as its own sample() does, would differ
    per_shard = np.concatenate([(lambda p: (p / p.min()) ** -buffer.beta)(
        buffer.priorities[batch.columns["state"][batch.shards == s]]) for s in range(4)])
    assert not np.allclose(per_shard, batch.weights)


def test_the_batch_names_each_experience_by_shard_and_slot():
    replay = sharded(SIZES[4])
    batch = replay.sample(64)
    starts = np.cumsum([0, *SIZES[4]])
    np.testing.assert_array_equal(batch.columns["state"], starts[batch.shards] + batch.indices)
    np.testing.assert_array_equal(batch.insertion_ids, batch.indices)  # one pass: id k in slot k
    assert len(replay) == K and batch.weights.shape == (64,)
    assert batch.columns["context"].shape == (64, 3)


def test_priority_updates_flow_back_to_their_shards():
    replay = sharded(SIZES[4])
    batch = replay.sample(64)
    before = [shard.priorities.copy() for shard in replay.shards]
    new_td = np.linspace(5.0, 6.0, 64)  # larger than any earlier TD error
    assert replay.update_priorities(batch.shards, batch.indices, batch.insertion_ids, new_td) == 64
    for s, shard in enumerate(replay.shards):
        mine = batch.shards == s
        expected = before[s].copy()
        expected[batch.indices[mine]] = shard.priorities_for(new_td[mine])  # last value wins on repeats
        np.testing.assert_array_equal(shard.priorities, expected)
    np.testing.assert_allclose(replay.masses(), [shard.priorities.sum() for shard in replay.shards])


def test_priority_updates_skip_overwritten_slots_and_reject_bad_input_before_any_change():
    replay = sharded(SIZES[2])
    batch = replay.sample(32)
    first = batch.shards == 0
    replay.shards[0].add(experiences(SIZES[2][0], 1000))  # overwrites every slot of shard 0
    before = [shard.priorities.copy() for shard in replay.shards]
    updated = replay.update_priorities(batch.shards, batch.indices, batch.insertion_ids, np.ones(32))
    assert updated == int((~first).sum())
    np.testing.assert_array_equal(replay.shards[0].priorities, before[0])
    before = [shard.priorities.copy() for shard in replay.shards]
    bad = np.ones(32)
    bad[-1] = np.nan  # on shard 1: shard 0's part would be applied first were it not checked up front
    with pytest.raises(ValueError, match="finite"):
        replay.update_priorities(batch.shards, batch.indices, batch.insertion_ids, bad)
    with pytest.raises(ValueError, match="shard numbers"):
        replay.update_priorities([2], [0], [0], [1.0])
    for shard, old in zip(replay.shards, before):
        np.testing.assert_array_equal(shard.priorities, old)


def test_stratified_split_is_within_two_of_the_expected_count_and_skips_empty_shards():
    rng = np.random.default_rng(3)
    for _ in range(200):
        masses = rng.exponential(size=6) * (rng.random(6) > 0.3)
        if not masses.any():
            continue
        counts = stratified_split(masses, 37, rng)
        assert counts.sum() == 37 and (counts[masses == 0] == 0).all()
        assert (np.abs(counts - 37 * masses / masses.sum()) < 2).all()


def test_empty_shards_are_never_asked_and_an_all_empty_replay_refuses():
    replay = ShardedReplay.create(3, 10, COLUMNS, alpha=0.6, beta0=0.4, beta_steps=100, seed=0)
    with pytest.raises(ValueError, match="every shard is empty"):
        replay.sample(8)
    replay.shards[1].add(experiences(4))
    batch = replay.sample(8)
    assert (batch.shards == 1).all() and len(replay) == 4
    with pytest.raises(ValueError, match="batch_size"):
        replay.sample(0)


def test_shards_must_share_their_priority_settings():
    with pytest.raises(ValueError, match="alpha"):
        ShardedReplay([make_buffer(4), make_buffer(4, alpha=0.7)])
    with pytest.raises(ValueError, match="at least one"):
        ShardedReplay([])
