"""Job plumbing without Ray or a database: the summary line, sharding, aggregation, bad export rows, the token."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli.jobs import job_names
from cluster.data.retention import write_parquet
from cluster.jobs import common
from cluster.jobs.evaluate import OVERALL, aggregate, format_tables, shards
from cluster.platform.errors import ServiceUnavailable
from cluster.platform.ray_token import ensure_auth_token, read_auth_token
from learners.policy_scores import paired_bootstrap


def _add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fail", action="store_true")


def _run(args: argparse.Namespace, settings) -> dict:
    if args.fail:
        raise ValueError("no such dataset")
    return {"rows": 3}


def test_a_job_ends_with_a_summary_line_that_says_how_it_went(capsys):
    assert common.main("demo", "demo job", _add, _run, []) == 0
    assert common.read_summary(capsys.readouterr().out) == {"job": "demo", "status": "succeeded", "rows": 3}
    assert common.main("demo", "demo job", _add, _run, ["--fail"]) == 1
    captured = capsys.readouterr()
    assert "error: no such dataset" in captured.err
    assert common.read_summary(captured.out)["status"] == "failed"
    with pytest.raises(ValueError, match="no summary"):
        common.read_summary("nothing here\n")


def test_every_job_takes_help_and_the_common_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        common.main("demo", "demo job", _add, _run, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "python -m cluster.jobs.demo" in out and "--address" in out and "--env-file" in out


def test_jobs_are_the_modules_of_the_package_but_its_shared_one():
    assert {"evaluate", "export"} <= set(job_names())
    assert "common" not in job_names()


def test_shards_cover_every_query_once_with_its_judgements():
    queries = {f"q{i:02d}": f"text {i}" for i in range(7)}
    qrels = {q: {"d": 1.0} for q in queries}
    parts = shards(queries, qrels, 3)
    assert [len(s.queries) for s in parts] == [3, 3, 1]
    assert sorted(q for s in parts for q in s.queries) == sorted(queries)
    assert all(set(s.qrels) == set(s.queries) for s in parts)


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"query_id": f"q{i}", "state_key": "a" if i % 3 else "b", "strategy": strategy,
             "ndcg@10": float(rng.random()), "p@5": float(rng.random()), "r@100": float(rng.random())}
            for i in range(30) for strategy in ("lexical", "dense")]


def test_aggregate_gives_overall_and_per_state_means_with_the_bootstrap_of_dtrag_eval():
    rows = _rows()
    metrics = {(m["scope"], m["strategy"], m["metric"]): m for m in aggregate(rows)}
    dense = sorted((r for r in rows if r["strategy"] == "dense"), key=lambda r: r["query_id"])
    expected = paired_bootstrap(np.array([r["ndcg@10"] for r in dense]), [r["query_id"] for r in dense])
    overall = metrics[(OVERALL, "dense", "ndcg@10")]
    assert (overall["queries"], overall["mean"], overall["low"], overall["high"]) == (
        30, pytest.approx(expected.mean), expected.low, expected.high)
    in_b = [r["p@5"] for r in rows if r["strategy"] == "lexical" and r["state_key"] == "b"]
    assert metrics[("b", "lexical", "p@5")]["queries"] == 10
    assert metrics[("b", "lexical", "p@5")]["mean"] == pytest.approx(np.mean(in_b))
    assert metrics[("a", "lexical", "p@5")]["queries"] == 20
    table = format_tables(list(metrics.values()))
    assert "## Overall" in table and "## State `a`" in table and "## State `b`" in table
    assert f"{overall['mean']:.4f} [{overall['low']:.4f}, {overall['high']:.4f}]" in table


def test_a_row_parquet_cannot_hold_is_skipped_and_named_when_asked_else_the_write_fails(tmp_path: Path):
    schema = pa.schema([("search_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
                        ("context", pa.list_(pa.float32()))])
    now = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
    rows = [{"search_id": "good", "created_at": now, "context": [0.5]},
            {"search_id": "bad", "created_at": now, "context": ["not a number"]},
            {"search_id": "yesterday", "created_at": now - dt.timedelta(days=1), "context": None}]
    with pytest.raises(pa.ArrowInvalid):
        write_parquet(rows, schema, tmp_path / "strict", "x")
    skipped: dict[str, str] = {}
    files = write_parquet(rows, schema, tmp_path / "lenient", "x", skipped)
    assert list(skipped) == ["bad"] and "float" in skipped["bad"]
    assert sorted(f.parent.name for f in files) == ["date=2026-11-29", "date=2026-11-30"]
    assert pq.read_table(tmp_path / "lenient" / "date=2026-11-30" / "x.parquet").column("search_id").to_pylist() == ["good"]


def test_the_ray_token_is_the_owners_alone_and_stable(tmp_path: Path):
    path = ensure_auth_token(tmp_path / "state")
    token = read_auth_token(path)
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert ensure_auth_token(tmp_path / "state") == path and read_auth_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ServiceUnavailable, match="dtrag up"):
        read_auth_token(tmp_path / "elsewhere" / "ray_auth_token")
