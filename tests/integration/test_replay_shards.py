"""The learning state over replay shards held by Ray actors: routed, sampled and learned from across
shards, checkpointed with the state, a killed shard restored from its checkpoint, and a restarted
state rolling the shards back to the checkpoint it restores."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import ray

from cluster.actors.start import learning_heads, start_actors, stop_actors
from learners.context import FEATURES
from learners.learning_core import RewardedSearch
from learners.sharded_replay import shard_of

pytestmark = pytest.mark.integration

SHARDS = 2


@pytest.fixture
async def sharded(ray_session, pool, live_settings):
    """The actors with two replay shards, and no stored learning state before or after."""

    async def clean() -> None:
        stop_actors()
        await pool.execute("DELETE FROM q_table_snapshots")
        await pool.execute("DELETE FROM replay_shard_checkpoints")

    await clean()
    learning = dataclasses.replace(live_settings.learning, replay_shards=SHARDS, checkpoint_interval_s=3600,
                                   core=dataclasses.replace(live_settings.learning.core, min_replay_size=8))
    yield start_actors(dataclasses.replace(live_settings, learning=learning))
    await clean()


def graded_searches(n: int, seed: int, actions: int) -> list[RewardedSearch]:
    """Searches served with action 0 whose every action was graded: `actions` experiences each."""
    rng = np.random.default_rng(seed)
    return [RewardedSearch(rng.uniform(0, 1, len(FEATURES)).tolist(), 0, 0.5, 10.0, 1.0, 0,
                           action_quality=rng.uniform(0, 1, actions).tolist(), action_costs=[10.0] * actions,
                           action_probabilities=[1.0] + [0.0] * (actions - 1)) for _ in range(n)]


async def test_the_learning_state_learns_across_shards_and_they_survive_restarts(sharded, pool, live_settings,
                                                                                  eventually):
    state, shards = sharded.learning_state, sharded.replay_shards
    actions = len(learning_heads(live_settings)["retrieval"].actions)

    async def loaded() -> dict | None:
        stats = await state.stats.remote()
        return stats if stats["loaded"] else None

    # rewarded searches the session's other modules recorded are replayed as the state loads
    held = np.array((await eventually(loaded, timeout_s=180))["replay_shards"])
    searches = graded_searches(60, seed=1, actions=actions)
    await state.add.remote("retrieval", searches)
    added = np.bincount([shard_of(s.context, SHARDS) for s in searches], minlength=SHARDS) * actions
    expected = held + added
    stats = await state.stats.remote()
    assert stats["replay_shards"] == expected.tolist() and min(added) > 0  # each search on its context's shard

    masses = [d["masses"]["retrieval"] for d in await asyncio.gather(*[shard.describe.remote() for shard in shards])]

    async def learned() -> dict | None:  # the running learners sample across both shards
        stats = await state.stats.remote()
        return stats if stats["updates_applied"] >= applied + 3 else None

    applied = stats["updates_applied"]
    await eventually(learned, timeout_s=60)
    described = await asyncio.gather(*[shard.describe.remote() for shard in shards])
    assert all(d["masses"]["retrieval"] != m for d, m in zip(described, masses, strict=True))  # TD errors came back

    await state.checkpoint.remote()  # the shards' buffers with it
    rows = await pool.fetch("SELECT shard, num_shards, sizes FROM replay_shard_checkpoints ORDER BY shard")
    assert [(row["shard"], row["num_shards"]) for row in rows] == [(0, SHARDS), (1, SHARDS)]
    saved = await asyncio.gather(*[shard.checkpoint.remote() for shard in shards])  # exactly what is stored
    assert [json.loads(row["sizes"]) for row in rows] == [s["sizes"] for s in saved]

    # a shard killed (its process gone, as with its node) comes back with its checkpoint
    killed_pid = (await shards[1].describe.remote())["pid"]
    ray.kill(shards[1], no_restart=False)

    async def restarted() -> dict | None:
        try:
            d = await shards[1].describe.remote()
        except ray.exceptions.RayActorError:
            return None
        return d if d["loaded"] and d["pid"] != killed_pid else None  # ray.kill returns before it dies

    back = (await eventually(restarted, timeout_s=60))["restored"]  # as loaded: learners go on changing it
    assert back["sizes"] == saved[1]["sizes"] and back["sizes"]["retrieval"] > 0
    assert back["masses"] == pytest.approx(saved[1]["masses"], rel=1e-12)

    # experiences added after the checkpoint and never recorded in the database: a restarted state
    # rolls the shards back to its checkpoint rather than keep them beside its older model
    await state.add.remote("retrieval", graded_searches(20, seed=2, actions=actions))
    grown = (await state.stats.remote())["replay_size"]
    assert grown == sum(expected) + 20 * actions
    ray.kill(state, no_restart=False)

    async def rolled_back() -> dict | None:
        try:
            stats = await state.stats.remote()
        except ray.exceptions.RayActorError:
            return None
        return stats if stats["loaded"] else None

    stats = await eventually(rolled_back, timeout_s=60)
    assert stats["replay_shards"] == [d["sizes"]["retrieval"] for d in saved]
