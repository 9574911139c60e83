"""Three Ray nodes on loopback: the app's replicas and the replay shards spread over them, and
losing the node that holds a shard restarts it elsewhere from its checkpoint while searches go on.

The cluster belongs to a driver process of its own (`tests/support/multinode.py`): a process
joins one Ray cluster, and this session's Ray may already be up, so nothing here can touch it.
It runs on a fresh database of the session's PostgreSQL, holding the sample corpus.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from cluster.data.corpus import sample_corpus_dir
from cluster.data.ingest import ingest
from cluster.platform.database import create_pool
from cluster.platform.migrate import migrate

from conftest import free_port, temporary_database

pytestmark = pytest.mark.integration

DRIVER = Path(__file__).resolve().parents[1] / "support" / "multinode.py"
SHARDS = 3  # round robin over three nodes: one on each
TIMEOUT_S = 480


@pytest.fixture
async def corpus_database(live_settings, embedder):
    """A migrated database on the session's server holding the sample corpus."""
    async with temporary_database(live_settings.database.url, "multinode") as url:
        connection = await asyncpg.connect(url)
        await migrate(connection)
        await connection.close()
        pool = await create_pool(url, live_settings.database)
        try:
            await ingest(pool, sample_corpus_dir(), embedder.encode, show_progress=False)
        finally:
            await pool.close()
        yield url


def run_driver(database_url: str, state_dir: Path) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("RAY_", "DTRAG_", "FEATURE_")) and key != "DATABASE_URL"}
    environment.update({
        "DATABASE_URL": database_url, "DTRAG_STATE_DIR": str(state_dir),
        "DTRAG_HTTP_PORT": str(free_port()), "DTRAG_METRICS_PORT": str(free_port()), "DTRAG_DASHBOARD_PORT": "0",
        "DTRAG_REPLAY_SHARDS": str(SHARDS), "DTRAG_LEARNERS": "1", "DTRAG_CHECKPOINT_INTERVAL_S": "3600",
        "FEATURE_EXPERIENCE_REPLAY": "on",  # searches are logged, so feedback rewards them
        # one replica each, pinned (no autoscaling): every CPU-needing replica fits on the head and serving node
        "DTRAG_INGRESS_REPLICAS": "1", "DTRAG_PIPELINE_REPLICAS": "1", "DTRAG_TREATMENT_REPLICAS": "1",
        "DTRAG_EMBEDDER_REPLICAS": "1",
        "PYTHONPATH": os.pathsep.join([str(DRIVER.parents[2]), environment.get("PYTHONPATH", "")]),
    })
    try:
        done = subprocess.run([sys.executable, str(DRIVER)], env=environment, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the multi-node driver took over {TIMEOUT_S} s; its output:\n{error.stdout}\n{error.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed ({done.returncode}):\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


async def test_losing_a_node_restarts_its_shard_elsewhere_from_its_checkpoint_while_searches_go_on(
        corpus_database, tmp_path):
    result = await asyncio.to_thread(run_driver, corpus_database, tmp_path / "state")
    before, spare = result["placement_before"], result["nodes"]["spare"]
    shards = sorted(name for name in before if name.startswith("replay_shard_"))
    assert len(shards) == SHARDS and len({before[name] for name in shards}) == SHARDS  # one on each node
    serving = {before[name] for name in ("Ingress", "arm_control", "arm_treatment", "Embedder")}
    assert len(serving) >= 2 and spare not in serving  # replicas over the head and the serving node

    assert sum(d["sizes"]["retrieval"] for d in result["saved"].values()) == result["replay_size"]
    for name, described in result["restored"].items():
        saved, restored = result["saved"][name], described["restored"]  # as loaded: learners go on changing it
        assert saved["node_id"] == spare and described["node_id"] != spare
        assert restored["sizes"] == saved["sizes"] and saved["sizes"]["retrieval"] > 0
        assert restored["masses"] == pytest.approx(saved["masses"], rel=1e-12)
        assert result["placement_after"][name] == described["node_id"]

    statuses = result["statuses"]
    assert result["removed_at"] >= 5 and len(statuses) >= result["restored_at"] + 5  # before, during and after
    assert set(statuses) == {200}, f"searches failed while the node went: {statuses}"
    print(f"shard back on another node {result['restore_s']:.1f} s after its node went; "
          f"{len(statuses) - result['removed_at']} searches answered from the removal on, all 200")
