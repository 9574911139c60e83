"""Driver of the multi-node test: a three-node Ray cluster on loopback, the app on it, one node lost.

Run in a process of its own (`tests/integration/test_multinode.py` starts it): a driver belongs
to one Ray cluster, and the test session already holds its own. Settings come from the
environment as for `dtrag up`, with DATABASE_URL a migrated database holding the sample corpus.

The cluster: the head (1 CPU: Serve's controller and the one HTTP proxy), a serving node (2 CPUs)
and a spare node with no CPU, where no Serve replica fits but actors that need none (the replay
shards, spread over every node) do. Losing the spare node must cost no search, and the shard it
held must come back on another node with what its checkpoint held.

Prints one JSON line (prefixed RESULT) with what it saw; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from cluster.actors import NAMESPACE  # noqa: E402
from cluster.actors.replay_shards import SHARD_PREFIX  # noqa: E402
from cluster.actors.start import learning_state  # noqa: E402
from cluster.data.beir import load_queries  # noqa: E402
from cluster.data.corpus import sample_corpus_dir  # noqa: E402
from cluster.platform.api_keys import create_key  # noqa: E402
from cluster.platform.ray_token import ensure_auth_token, require_token  # noqa: E402
from cluster.platform.runtime import bind_replica_grpc_to_node_ip, deploy, start_serve  # noqa: E402
from cluster.platform.settings import Settings, load_settings  # noqa: E402

FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}  # a lost node is seen in ~2 s
SERVING_DEPLOYMENTS = ("Ingress", "arm_control", "Embedder")  # the search path at the baseline stage


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = probe()
        except Exception as error:  # an actor restarting, a node going: try again
            result = error
        if result and not isinstance(result, Exception):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s; last {result!r}")
        time.sleep(0.2)


def placement() -> dict[str, str]:
    """Node of every live actor of the app, by Serve deployment or actor name."""
    import ray._private.state as state

    where = {}
    for actor in state.actors().values():
        if actor["State"] != "ALIVE":
            continue
        name = actor["Name"] if actor["Name"].startswith(SHARD_PREFIX) else actor["ActorClassName"].rsplit(":", 1)[-1]
        where[name] = actor["Address"]["NodeID"]
    return where


class SearchLoop:
    """Searches one after another on a thread, recording each status, until stopped."""

    def __init__(self, client: httpx.Client, queries: list[str]):
        self._client, self._queries = client, queries
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(10**9):
            if self._stop.is_set():
                return
            try:
                status = self._client.post("/api/v1/search/", json={
                    "q": self._queries[i % len(self._queries)], "final_topk": 5}).status_code
            except httpx.HTTPError:
                status = 0
            self.statuses.append(status)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.statuses


def learn(client: httpx.Client, queries: list[str]) -> int:
    """Search each query and grade its top hit: every action of it enters the replay; how many searches."""
    for query in queries:
        served = client.post("/api/v1/search/", json={"q": query, "final_topk": 5})
        served.raise_for_status()
        body = served.json()
        client.post("/api/v1/feedback", json={"search_id": body["search_id"],
                                              "judgements": {body["hits"][0]["doc_id"]: 2}}).raise_for_status()
    return len(queries)


def run(settings: Settings) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import APP_NAME, build_app

    require_token(ensure_auth_token(settings.state_dir))
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_DEATH})
    try:
        cluster.add_node(num_cpus=2)
        spare = cluster.add_node(num_cpus=0)
        cluster.wait_for_nodes()  # the shards are placed over the nodes alive when they start
        hook = f"{bind_replica_grpc_to_node_ip.__module__}.{bind_replica_grpc_to_node_ip.__name__}"
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": hook})
        start_serve(settings.http, proxy_location="HeadOnly")
        deploy(build_app(settings), APP_NAME)
        return exercise(settings, spare.node_id, lambda: cluster.remove_node(spare, allow_graceful=False))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def exercise(settings: Settings, spare_node: str, remove_spare: Callable[[], None]) -> dict[str, Any]:
    import ray

    async def new_key() -> str:
        connection = await asyncpg.connect(settings.database.url)
        try:
            return await create_key(connection, "multinode", ["search", "admin"])
        finally:
            await connection.close()

    queries = list(load_queries(sample_corpus_dir()).values())
    client = httpx.Client(base_url=f"http://{settings.http.host}:{settings.http.port}",
                          headers={"X-API-Key": asyncio.run(new_key())}, timeout=30)
    state = learning_state()
    searches = learn(client, queries)
    actions = len(settings.retrieval.actions)
    wait_for("every graded search in the replay",
             lambda: ray.get(state.stats.remote())["replay_size"] == searches * actions)
    ray.get(state.checkpoint.remote())  # the shards write their buffers with it
    before = placement()
    shards = {name: ray.get_actor(name, namespace=NAMESPACE) for name in before if name.startswith(SHARD_PREFIX)}
    # once more, for the exact sizes and masses stored (the learners change priorities meanwhile)
    saved = {name: {**ray.get(shard.checkpoint.remote()), "node_id": before[name]} for name, shard in shards.items()}
    lost = sorted(name for name, d in saved.items() if d["node_id"] == spare_node)
    if not lost:
        raise RuntimeError(f"no replay shard was placed on the spare node {spare_node}: {before}")
    loop = SearchLoop(client, queries)
    wait_for("searches answered before the node goes", lambda: len(loop.statuses) >= 5)
    removed_at = len(loop.statuses)
    started = time.monotonic()
    remove_spare()

    def back(name: str) -> dict[str, Any] | None:
        d = ray.get(shards[name].describe.remote(), timeout=10)
        return d if d["loaded"] and d["node_id"] != spare_node else None

    restored = {name: wait_for(f"{name} restarted on another node", lambda name=name: back(name)) for name in lost}
    restore_s = time.monotonic() - started
    after_restore = len(loop.statuses)
    wait_for("searches answered after the restore", lambda: len(loop.statuses) >= after_restore + 5)
    statuses = loop.stop()
    return {
        "nodes": {"spare": spare_node},
        "placement_before": before,
        "placement_after": placement(),
        "saved": saved,
        "restored": restored,
        "statuses": statuses,
        "removed_at": removed_at,
        "restored_at": after_restore,
        "restore_s": restore_s,
        "replay_size": searches * actions,
    }


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    # Ray's files, and the "current cluster" record it writes for a Cluster's head, in a folder of
    # our own rather than the machine's /tmp/ray; short, as Ray's socket paths must be
    with tempfile.TemporaryDirectory(prefix="dtrag-mn-", dir="/tmp") as temp_dir:
        os.environ["RAY_TMPDIR"] = temp_dir
        result = run(settings)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
