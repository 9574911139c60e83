"""The control and learning actors start while PostgreSQL is down, answer with safe defaults, and
load the stored state once it is back; a checkpoint that cannot be read is rebuilt from rewards."""

from __future__ import annotations

import json

import pytest

from cluster.actors.learning_state import HEADS
from cluster.actors.start import learning_heads, start_actors, stop_actors
from cluster.core.rollout import RolloutState
from cluster.core.vocabulary import Arm
from cluster.platform.embedded import server_stopped
from learners import checkpoint
from learners.context import FEATURES
from learners.learning_core import Experience, LearningCore

pytestmark = pytest.mark.integration


@pytest.fixture
async def clean_state(ray_session, pool):
    """No actors, no stored rollout state and no checkpoints before and after."""

    async def clean() -> None:
        stop_actors()
        await pool.execute("DELETE FROM rollout_state")
        await pool.execute("DELETE FROM q_table_snapshots")

    await clean()
    yield
    await clean()


async def store_checkpoint(pool, policy_version: int, blob: bytes) -> None:
    await pool.execute(
        "INSERT INTO q_table_snapshots (policy_version, actions, q_table, replay_state, stats) "
        "VALUES ($1, $2, '{}'::jsonb, $3, '{}'::jsonb)", policy_version, ["x"], blob)


def learned_state(live_settings, experiences: int) -> bytes:
    heads = learning_heads(live_settings)
    cores = {name: LearningCore(heads[name].actions, FEATURES, heads[name].default_action, live_settings.learning.core)
             for name in HEADS}
    cores["retrieval"].add([Experience([0.1] * len(FEATURES), 1, 0.5, 0.5, 0) for _ in range(experiences)])
    return checkpoint.encode({name: core.state_dict() for name, core in cores.items()})


async def test_actors_start_with_the_database_down_and_load_when_it_returns(
        clean_state, pool, live_settings, eventually):
    stored = RolloutState.from_json({
        "version": 41, "stage": "replay_10", "treatment_weight": 0.1,
        "flags": {arm.value: live_settings.features.as_dict() for arm in Arm}, "events": [], "rolled_back": None})
    await pool.execute("INSERT INTO rollout_state (singleton, state) VALUES (true, $1::jsonb)",
                       json.dumps(stored.to_json()))
    await store_checkpoint(pool, 77, learned_state(live_settings, experiences=40))

    with server_stopped(live_settings.state_dir):
        actors = start_actors(live_settings)
        live = await actors.rollout_control.live_if_newer.remote(0)
        assert (live.version, live.treatment_weight) == (1, 0.0)  # control serves everyone
        status = await actors.rollout_control.status.remote()
        assert status["store"]["loaded"] is False and status["stage"] == "baseline"
        stats = await actors.learning_state.stats.remote()
        assert stats["loaded"] is False and stats["replay_size"] == 0  # the default policy
        assert await actors.learning_state.policy_if_newer.remote(0) is not None
        assert await actors.learning_state.policy_if_newer.remote(5) is None  # a replica keeps its policy

    async def rollout_loaded() -> dict | None:
        status = await actors.rollout_control.status.remote()
        return status if status["store"]["loaded"] else None

    async def learning_loaded() -> dict | None:
        stats = await actors.learning_state.stats.remote()
        return stats if stats["loaded"] else None

    status = await eventually(rollout_loaded, timeout_s=30)
    assert (status["version"], status["stage"], status["treatment_weight"]) == (41, "replay_10", 0.1)
    stats = await eventually(learning_loaded, timeout_s=30)
    assert stats["restored_from_version"] == 77 and stats["replay_size"] >= 40


@pytest.mark.parametrize("damage", [
    lambda blob: blob[: len(blob) // 2],
    lambda blob: blob.replace(checkpoint.MAGIC, b"DTRAG-CHECKPOINX"),
])
async def test_an_unreadable_checkpoint_is_rebuilt_from_the_rewards(clean_state, pool, live_settings, eventually,
                                                                    damage):
    await store_checkpoint(pool, 77, damage(learned_state(live_settings, experiences=40)))
    state = start_actors(live_settings).learning_state

    async def loaded() -> dict | None:
        stats = await state.stats.remote()
        return stats if stats["loaded"] else None

    stats = await eventually(loaded, timeout_s=30)
    assert stats["restored_from_version"] is None  # rebuilt from the recorded rewards, not from the checkpoint
    assert await state.checkpoint.remote() >= 0  # and it checkpoints again, in the current format
    blob = await pool.fetchval("SELECT replay_state FROM q_table_snapshots ORDER BY id DESC LIMIT 1")
    assert set(checkpoint.decode(blob)) == set(HEADS)
