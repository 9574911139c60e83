"""The export job against a real PostgreSQL; what it writes read back with pandas and Ray Data."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from cluster.jobs.export import export, run

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)


async def _seed(pool) -> dt.datetime:
    """Five searches over three UTC days: rewarded or not, with a context or not (an old row)."""
    today = dt.datetime.now(dt.UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    rows = [("s1", today - 2 * DAY, [0.5, 0.25], 0.75), ("s2", today - DAY, [0.1, 0.2], None),
            ("s3", today - DAY, None, 0.5), ("s4", today, [0.3, 0.3], 1.0), ("s5", today, [0.2, 0.9], None)]
    await pool.executemany(
        """INSERT INTO experiences (search_id, created_at, arm, state_key, action, strategy, propensity,
                                    action_probabilities, policy_version, served_doc_ids, context, reward,
                                    cost_cpu_ms)
           VALUES ($1, $2, 'control', 'len=short|form=keyword|agree=mid|digits=no', 1, 'hybrid@0.3', 0.8,
                   ARRAY[0.1, 0.8, 0.1]::real[], 7, ARRAY['d1', 'd2'], $3::real[], $4, 12.5)""", rows)
    return today


async def test_export_writes_a_dataset_by_date_that_pandas_and_ray_data_read(empty_pool, fresh_database_url,
                                                                               tmp_path: Path, ray_session):
    import ray

    today = await _seed(empty_pool)
    out = tmp_path / "export"
    summary = await export(fresh_database_url, out, None, None, batch_rows=2)  # batches span days: 2+2+1 files
    assert summary == {"rows": 5, "without_context": 1, "without_reward": 2, "skipped": 0, "files": 5, "days": 3,
                       "first_day": (today - 2 * DAY).date().isoformat(), "last_day": today.date().isoformat(),
                       "out": str(out)}
    assert sorted(p.name for p in out.iterdir()) == [f"date={(today - n * DAY).date()}" for n in (2, 1, 0)]

    frame = pd.read_parquet(out).sort_values("search_id")
    assert list(frame["search_id"]) == ["s1", "s2", "s3", "s4", "s5"]
    assert frame["date"].astype(str).tolist() == [str((today - n * DAY).date()) for n in (2, 1, 1, 0, 0)]
    first = frame.iloc[0]
    assert (first["action"], first["strategy"], first["policy_version"], first["arm"]) == (1, "hybrid@0.3", 7, "control")
    assert first["propensity"] == pytest.approx(0.8) and list(first["context"]) == pytest.approx([0.5, 0.25])
    assert list(first["action_probabilities"]) == pytest.approx([0.1, 0.8, 0.1])
    assert first["reward"] == 0.75 and first["cost_cpu_ms"] == 12.5
    assert first["created_at"] == pd.Timestamp(today - 2 * DAY)

    dataset = ray.data.read_parquet(str(out))
    assert dataset.count() == 5
    assert {"search_id", "context", "action", "propensity", "reward", "cost_cpu_ms", "arm", "policy_version",
            "created_at", "date"} <= set(dataset.schema().names)
    assert sorted(row["search_id"] for row in dataset.take_all()) == ["s1", "s2", "s3", "s4", "s5"]


async def test_export_takes_a_date_range_and_never_writes_into_a_used_folder(empty_pool, fresh_database_url,
                                                                              live_settings, tmp_path: Path):
    today = await _seed(empty_pool)
    settings = live_settings.with_database_url(fresh_database_url)
    args = argparse.Namespace(out=tmp_path / "range", since=today.replace(hour=0) - DAY, until=today.replace(hour=0))
    summary = await _in_thread(run, args, settings)
    assert (summary["rows"], summary["days"], summary["first_day"]) == (2, 1, (today - DAY).date().isoformat())
    with pytest.raises(ValueError, match="not empty"):
        await _in_thread(run, args, settings)


async def _in_thread(function, *args):
    """`run` calls asyncio.run, which a coroutine test cannot do on its own loop."""
    import asyncio

    return await asyncio.to_thread(function, *args)
