"""`LearningState`: the named, restartable Ray actor that owns the replay buffer and the Q-table.

It wraps `LearningCore` with persistence: a checkpoint (Q-table as JSON, the whole state as a
blob) goes to PostgreSQL on a schedule and on request; on (re)start the latest checkpoint is
loaded and rewarded experiences that arrived after it are replayed in, so a killed actor comes
back with what it had, less only the Q updates since its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import ray

from cluster.core.vocabulary import STRATEGIES
from cluster.platform.database import run_blocking
from cluster.platform.metrics import LearningMetrics
from cluster.platform.settings import LearningSettings
from learners.learning_core import Experience, LearnerBatch, LearningCore, PolicySnapshot, RewardedSearch
from learners.soft_q import QDelta
from learners.state_encoder import state_key

log = logging.getLogger(__name__)

ACTOR_NAME = "learning_state"
_KEEP_CHECKPOINTS = 5


_REWARDED_SINCE = """
SELECT state_key, action, reward, propensity, policy_version, next_state_key, action_rewards,
       action_probabilities
FROM experiences
WHERE reward IS NOT NULL AND ($1::timestamptz IS NULL OR feedback_at > $1)
ORDER BY feedback_at DESC
LIMIT $2"""


@ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0)
class LearningState:
    """Calls run one at a time (a synchronous actor); a thread checkpoints on a schedule."""

    def __init__(self, database_url: str, settings: LearningSettings):
        self._url = database_url
        self._core = LearningCore(STRATEGIES, settings.core)
        self._lock = threading.Lock()  # the checkpoint thread reads the core too
        self._restored_from = run_blocking(self._restore())
        self._metrics = LearningMetrics()
        self._publish()
        threading.Thread(
            target=self._checkpoint_every, args=(settings.checkpoint_interval_s,), daemon=True
        ).start()

    async def _restore(self) -> int | None:
        """Load the latest checkpoint and the rewards recorded after it; returns its version."""
        connection = await asyncpg.connect(self._url)
        try:
            checkpoint = await connection.fetchrow(
                "SELECT policy_version, replay_state, created_at FROM q_table_snapshots "
                "ORDER BY id DESC LIMIT 1"
            )
            since = None
            if checkpoint is not None:
                try:
                    self._core.load_state_dict(pickle.loads(checkpoint["replay_state"]))
                    since = checkpoint["created_at"]
                except ValueError as error:  # written by an older version: learn again from the rewards
                    log.warning("checkpoint not restored; rebuilding from the recorded rewards",
                                extra={"policy_version": checkpoint["policy_version"], "error": str(error)})
                    checkpoint = None
            rows = await connection.fetch(_REWARDED_SINCE, since, self._core.config.capacity)
        finally:
            await connection.close()
        experiences = [e for row in reversed(rows) for e in RewardedSearch.from_row(row).experiences()]
        self._core.add(experiences[-self._core.config.capacity:])
        return None if checkpoint is None else checkpoint["policy_version"]

    def _publish(self) -> None:
        self._metrics.replay_buffer_size.set(len(self._core.buffer))
        self._metrics.q_table_size.set(len(self._core.table.snapshot().rows))

    def add(self, experiences: Sequence[Experience]) -> int:
        with self._lock:
            size = self._core.add(experiences)
            self._publish()
            return size

    def sample(self, batch_size: int) -> LearnerBatch | None:
        with self._lock:
            return self._core.sample(batch_size)

    def apply_update(self, delta: QDelta, indices, insertion_ids, td_errors) -> bool:
        with self._lock:
            applied = self._core.apply_update(delta, indices, insertion_ids, td_errors)
            self._publish()
            return applied

    def policy_if_newer(self, version: int) -> PolicySnapshot | None:
        """The policy when its version differs from `version` (cheap to poll), else None."""
        with self._lock:
            return None if self._core.table.version == version else self._core.policy()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._core.stats(), "restored_from_version": self._restored_from}

    def q_table(self) -> dict[str, Any]:
        with self._lock:
            return {"policy_version": self._core.table.version, "actions": list(self._core.actions),
                    "tau": self._core.table.tau, "pooled": self._core.pooled_q(),
                    "q": self._q_by_key()}

    def _q_by_key(self) -> dict[str, list[float]]:
        """Q rows under their readable state keys (JSON for operators and checkpoints)."""
        return {state_key(state): q for state, q in self._core.q_table().items()}

    def checkpoint(self) -> int:
        """Write a checkpoint now; returns the policy version saved."""
        with self._lock:
            version = self._core.table.version
            blob = pickle.dumps(self._core.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)
            q_table = self._q_by_key()
            stats = self._core.stats()
        run_blocking(self._write_checkpoint(version, blob, q_table, stats))
        return version

    async def _write_checkpoint(self, version: int, blob: bytes, q_table: dict, stats: dict) -> None:
        connection = await asyncpg.connect(self._url)
        try:
            async with connection.transaction():
                await connection.execute(
                    "INSERT INTO q_table_snapshots (policy_version, actions, q_table, replay_state, stats) "
                    "VALUES ($1, $2, $3::jsonb, $4, $5::jsonb)",
                    version, list(self._core.actions), json.dumps(q_table), blob, json.dumps(stats),
                )
                await connection.execute(
                    "DELETE FROM q_table_snapshots WHERE id <= (SELECT max(id) FROM q_table_snapshots) - $1",
                    _KEEP_CHECKPOINTS,
                )
        finally:
            await connection.close()

    def _checkpoint_every(self, interval_s: float) -> None:
        last_saved = self._core.table.version, self._core.inserted
        while True:
            time.sleep(interval_s)
            current = self._core.table.version, self._core.inserted
            if current == last_saved:
                continue
            try:
                self.checkpoint()
                last_saved = current
            except Exception:  # keep serving; the next tick retries
                log.exception("checkpoint failed")

    def export_parquet(self, path: str) -> int:
        """Write the buffer's experiences to a Parquet file; returns the row count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            state = self._core.buffer.state_dict()
            filled = state["insertion_id"] >= 0
        table = pa.table({
            "insertion_id": state["insertion_id"][filled],
            "state_key": [state_key(s) for s in state["state"][filled]],
            "action": state["action"][filled],
            "strategy": [self._core.actions[a] for a in state["action"][filled]],
            "reward": state["reward"][filled],
            "propensity": state["propensity"][filled],
            "policy_version": state["policy_version"][filled],
            "next_state_key": [None if s < 0 else state_key(s) for s in state["next_state"][filled]],
            "priority": state["priorities"][: len(filled)][filled],
        }).sort_by("insertion_id")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return table.num_rows
