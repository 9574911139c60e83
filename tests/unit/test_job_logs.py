import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.jobs.logs import COLUMNS, read_logs

START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def row(minute: int, **changes) -> dict:
    base = {"created_at": START + dt.timedelta(minutes=minute), "context": [0.1, 0.2], "action": 1, "quality": 0.5,
            "cost_cpu_ms": 10.0, "propensity": 0.5, "policy_version": 3, "next_context": None,
            "action_quality": None, "action_costs": None, "action_probabilities": [0.5, 0.5]}
    return {**base, **changes}


def write_export(folder, rows: list[dict]) -> None:
    """Rows as an export writes them: Hive folders by date, the columns offline jobs read."""
    schema = pa.schema([("created_at", pa.timestamp("us", tz="UTC")), ("context", pa.list_(pa.float32())),
                        ("action", pa.int16()), ("quality", pa.float64()), ("cost_cpu_ms", pa.float32()),
                        ("propensity", pa.float32()), ("policy_version", pa.int32()),
                        ("next_context", pa.list_(pa.float32())), ("action_quality", pa.list_(pa.float64())),
                        ("action_costs", pa.list_(pa.float32())), ("action_probabilities", pa.list_(pa.float32()))])
    assert schema.names == list(COLUMNS)
    day = folder / f"date={START.date()}"
    day.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), day / "part-0.parquet")


def test_unusable_rows_are_counted_by_reason_and_the_rest_kept_oldest_first(tmp_path):
    write_export(tmp_path, [
        row(5, quality=0.9), row(1), row(2, quality=None), row(3, context=None), row(4, context=[0.1, 0.2, 0.3]),
        row(6, action=7), row(7, propensity=0.0),
    ])
    logs = read_logs(tmp_path, n_actions=2, n_features=2)
    assert [s.quality for s in logs.searches] == [0.5, 0.9]
    assert logs.skipped == {"no feedback": 1, "no context": 1, "a context of 3 features, not 2": 1,
                            "an action the service does not have": 1, "no usable propensity": 1}
    assert logs.first_served.startswith("2026-11-01T00:01") and logs.last_served.startswith("2026-11-01T00:05")
    assert len(read_logs(tmp_path, 2, 2, since=START + dt.timedelta(minutes=3)).searches) == 1


def test_rewards_use_each_actions_mean_measured_cost(tmp_path):
    write_export(tmp_path, [
        row(1, action=0, quality=0.6, cost_cpu_ms=0.0, propensity=0.25),
        row(2, action=1, quality=0.8, cost_cpu_ms=30.0),
        row(3, action=1, quality=0.7, cost_cpu_ms=10.0, action_quality=[0.5, 0.7], action_costs=[2.0, 10.0]),
    ])
    logs = read_logs(tmp_path, 2, 2)
    assert logs.searches[2].action_costs == [2.0, 10.0]  # graded: every action's cost was measured
    assert logs.expected_costs(2) == pytest.approx([1.0, 20.0])
    logged = logs.logged(cost_weight=0.01, n_actions=2)
    assert logged.rewards == pytest.approx([0.6 - 0.01, 0.8 - 0.2, 0.7 - 0.2])
    assert logged.propensities == pytest.approx([0.25, 0.5, 0.5]) and logged.refused == 0
    assert np.array_equal(logged.actions, [0, 1, 1])


def test_a_folder_that_is_not_an_export_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m cluster.jobs.export"):
        read_logs(tmp_path / "missing", 2, 2)
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other" / "part.parquet")
    with pytest.raises(ValueError, match="not an export of experiences"):
        read_logs(tmp_path / "other", 2, 2)
