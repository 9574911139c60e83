"""Retention of experiences against a real PostgreSQL: what goes, what the learning actor keeps, the export."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from cluster.actors.learning_state import _REWARDED_SINCE, LearningState
from cluster.actors.start import learning_heads
from cluster.cli.main import main as dtrag
from cluster.data.retention import RetentionPolicy, prunable_count, prune_experiences
from cluster.platform.settings import RetentionSettings

pytestmark = pytest.mark.integration

HOUR, DAY = dt.timedelta(hours=1), dt.timedelta(days=1)
CHECKPOINT_AGE = 2 * HOUR

# name -> (age, feedback_at age (a rewarded retrieval search), answer_rated_at age)
ROWS = {
    **{f"new{i}": (i * 10 * dt.timedelta(minutes=1), None, None) for i in range(1, 6)},  # after the checkpoint
    **{f"mid{i}": (i * DAY, None, None) for i in range(1, 5)},  # beyond the newest 3
    **{f"old{i}": (40 * DAY, None, None) for i in range(1, 4)},  # past 28 days
    "rewarded_old": (50 * DAY, 45 * DAY, None),  # the third newest reward: capacity is 2
    "rewarded_kept": (50 * DAY, 44 * DAY, None),  # among the 2 newest rewards
    "rewarded_after_checkpoint": (50 * DAY, HOUR, None),
    "rated_answer": (60 * DAY, None, 46 * DAY),  # the newest rated answer
}
PRUNED = {"mid1", "mid2", "mid3", "mid4", "old1", "old2", "old3", "rewarded_old"}
KEPT_FOR_LEARNING = {"new4", "new5", "rewarded_kept", "rewarded_after_checkpoint", "rated_answer"}
POLICY = RetentionPolicy(max_age=28 * DAY, max_rows=3, capacity=2)


async def seed(pool, rows: dict = ROWS, checkpoint: bool = True) -> dt.datetime:
    """The `rows` (of ROWS) and a checkpoint CHECKPOINT_AGE old; returns the database's now."""
    now = await pool.fetchval("SELECT now()")
    await pool.executemany(
        """INSERT INTO experiences (search_id, created_at, arm, state_key, action, strategy, propensity,
                                    policy_version, served_doc_ids, context, reward, feedback_at,
                                    answer_action, answer_propensity, answer_reward, answer_rated_at)
           VALUES ($1, $2, 'control', 's', 0, 'bm25', 0.5, 1, ARRAY['d1', 'd2'], ARRAY[0.5, 0.25]::real[],
                   $3, $4, $5, $6, $7, $8)""",
        [(name, now - age,
          0.5 if feedback else None, now - feedback if feedback else None,
          1 if rated else None, 1.0 if rated else None, 1.0 if rated else None, now - rated if rated else None)
         for name, (age, feedback, rated) in rows.items()])
    if checkpoint:
        await pool.execute(
            "INSERT INTO q_table_snapshots (created_at, policy_version, actions, q_table, replay_state, stats) "
            "VALUES ($1, 1, ARRAY['bm25'], '{}', '', '{}')", now - CHECKPOINT_AGE)
    return now


async def replayed(pool, since: dt.datetime | None, capacity: int) -> dict[str, list]:
    """What a restarted learning actor reads back, per head."""
    return {head: [tuple(row) for row in await pool.fetch(query, since, capacity)]
            for head, query in _REWARDED_SINCE.items()}


async def test_rows_past_age_and_count_go_to_parquet_first_and_learning_keeps_its_own(empty_pool, tmp_path):
    now = await seed(empty_pool)
    checkpoint = now - CHECKPOINT_AGE
    restart_before = (await replayed(empty_pool, checkpoint, POLICY.capacity),
                      await replayed(empty_pool, None, POLICY.capacity))
    async with empty_pool.acquire() as connection:
        assert await prunable_count(connection, POLICY) == (len(PRUNED), len(KEPT_FOR_LEARNING))
        report = await prune_experiences(connection, POLICY, tmp_path / "export", batch_rows=3)

    remaining = {r["search_id"] for r in await empty_pool.fetch("SELECT search_id FROM experiences")}
    assert remaining == set(ROWS) - PRUNED
    assert (report.deleted, report.kept_for_learning) == (len(PRUNED), len(KEPT_FOR_LEARNING))
    assert report.latest_checkpoint == checkpoint
    # A restart, from the checkpoint or rebuilding without it, reads back exactly what it did.
    assert (await replayed(empty_pool, checkpoint, POLICY.capacity),
            await replayed(empty_pool, None, POLICY.capacity)) == restart_before

    exported = pd.read_parquet(tmp_path / "export")
    assert sorted(exported["search_id"]) == sorted(PRUNED)
    days = {name: (now - ROWS[name][0]).astimezone(dt.UTC).date().isoformat() for name in PRUNED}
    assert {row.search_id: str(row.date) for row in exported.itertuples()} == days
    assert {f.parent.name for f in report.files} == {f"date={day}" for day in days.values()}
    dataset = ds.dataset(tmp_path / "export", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == len(PRUNED)
    assert table.schema.field("context").type.value_type == pa.float32()  # real[], as in the table
    assert table.schema.field("created_at").type.tz == "UTC"
    rewarded = exported.set_index("search_id").loc["rewarded_old"]
    assert rewarded["reward"] == 0.5 and list(rewarded["served_doc_ids"]) == ["d1", "d2"]

    async with empty_pool.acquire() as connection:  # a second run finds nothing more to do
        assert (await prune_experiences(connection, POLICY, tmp_path / "export")).deleted == 0


async def test_without_a_checkpoint_only_the_newest_rewards_are_kept(empty_pool):
    await seed(empty_pool)
    await empty_pool.execute("DELETE FROM q_table_snapshots")
    async with empty_pool.acquire() as connection:
        report = await prune_experiences(connection, POLICY)
    remaining = {r["search_id"] for r in await empty_pool.fetch("SELECT search_id FROM experiences")}
    assert remaining == {"new1", "new2", "new3", "rewarded_kept", "rewarded_after_checkpoint", "rated_answer"}
    assert report.latest_checkpoint is None


async def test_no_limits_delete_nothing(empty_pool):
    await seed(empty_pool)
    async with empty_pool.acquire() as connection:
        report = await prune_experiences(connection, RetentionPolicy(None, None, capacity=2))
    assert report.deleted == 0
    assert await empty_pool.fetchval("SELECT count(*) FROM experiences") == len(ROWS)


async def test_dtrag_db_prune_exports_and_deletes(empty_pool, fresh_database_url, monkeypatch, tmp_path: Path,
                                                  capsys):
    await seed(empty_pool)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    assert await asyncio.to_thread(dtrag, ["db", "prune", "--max-rows", "3", "--dry-run"]) == 0
    # Capacity is 10,000 here, so every rewarded search is kept with those after the checkpoint.
    assert "would delete 7 experiences; 6 past the limits kept" in capsys.readouterr().out
    assert await empty_pool.fetchval("SELECT count(*) FROM experiences") == len(ROWS)

    assert await asyncio.to_thread(dtrag, ["db", "prune", "--max-rows", "3", "--export", str(tmp_path / "out")]) == 0
    assert "deleted 7 experiences, exported first to" in capsys.readouterr().out
    gone = {"mid1", "mid2", "mid3", "mid4", "old1", "old2", "old3"}
    assert set(pd.read_parquet(tmp_path / "out")["search_id"]) == gone
    assert await empty_pool.fetchval("SELECT count(*) FROM experiences") == len(ROWS) - len(gone)
    assert await asyncio.to_thread(dtrag, ["db", "prune", "--max-rows", "-1"]) == 1
    assert ">= 0" in capsys.readouterr().err


async def test_the_learning_actor_prunes_on_its_schedule(ray_session, empty_pool, fresh_database_url, settings,
                                                          tmp_path: Path, eventually):
    import ray

    unrewarded = {name: row for name, row in ROWS.items() if name[:3] in ("new", "mid", "old")}
    await seed(empty_pool, unrewarded, checkpoint=False)
    retention = RetentionSettings(max_age_days=28, max_rows=3, interval_s=0.5, export_dir=str(tmp_path / "out"))
    actor = LearningState.remote(fresh_database_url, settings.learning, learning_heads(settings), retention)
    try:
        async def pruned() -> set[str]:
            remaining = {r["search_id"] for r in await empty_pool.fetch("SELECT search_id FROM experiences")}
            return remaining if remaining == {"new1", "new2", "new3"} else set()

        await eventually(pruned, timeout_s=120)
        assert set(pd.read_parquet(tmp_path / "out")["search_id"]) == set(unrewarded) - {"new1", "new2", "new3"}
    finally:
        ray.kill(actor, no_restart=True)
