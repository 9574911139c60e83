"""Replay shards: restartable Ray actors, each holding one slice of every head's prioritized replay.

With `learning.replay_shards` = N > 1 the `LearningState` keeps the value models and N `ReplayShard`
actors keep the experiences, routed by `learners.sharded_replay.shard_of`. The state samples across
them through `RemoteShards`: the two-stage math of `ShardedSampler` (one look at every shard's mass,
one draw per shard, in parallel; importance weights over the whole replay), so a batch is drawn as
one buffer holding everything would draw it. With N = 1 there are no shard actors: the state holds
its one buffer, as before, and no process is added.

A shard checkpoints its buffers to PostgreSQL (`replay_shard_checkpoints`) when the state
checkpoints, so the state's checkpoint and the shards' describe the same moment. A restarted shard
loads its latest checkpoint on a thread that retries while the database is down; until then it
offers nothing to sample and keeps what it is given, added once the checkpoint is in. A restarted
state rolls every shard back to its checkpoint (`restore`) before it replays the rewards recorded
since, so nothing is counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray

from cluster.actors.persistence import connection, in_background, retry_until_done
from cluster.platform.database import run_blocking
from cluster.platform.metrics import report_memory_every
from learners import checkpoint as codec
from learners.learning_core import LearningConfig
from learners.replay import EPS, PrioritizedReplayBuffer, experience_columns
from learners.sharded_replay import ShardDraw, ShardedSampler, ShardStatus, draw_from

log = logging.getLogger(__name__)


CALL_TIMEOUT_S = 5.0  # a shard that does not answer (its node lost, restarting) fails the call, not the state
SHARD_CHECKPOINT_TIMEOUT_S = 30.0  # writing or reading every head's buffer


SHARD_PREFIX = "replay_shard_"


def shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard}"


def shard_capacity(capacity: int, num_shards: int) -> int:
    """Slots per shard: the configured capacity is the whole replay's, so memory stays as set."""
    return -(-capacity // num_shards)


_SAVE = """
INSERT INTO replay_shard_checkpoints (shard, num_shards, sizes, state) VALUES ($1, $2, $3::jsonb, $4)
ON CONFLICT (shard) DO UPDATE SET num_shards = excluded.num_shards, saved_at = now(), sizes = excluded.sizes,
                                  state = excluded.state"""


# Ray ignores a soft node affinity for an actor that requests no resource at all (it lands on any
# node), so a shard reserves memory: a process's worth, and a buffer of capacity / N is far less.
SHARD_MEMORY_BYTES = 64 * 2**20


@ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0, memory=SHARD_MEMORY_BYTES)
class ReplayShard:
    """Shard `shard` of N: per head, a prioritized replay buffer of capacity / N slots."""

    def __init__(self, database_url: str, shard: int, num_shards: int, config: LearningConfig,
                 context_dim: int, heads: Mapping[str, int]):
        """`heads`: each learning head's number of actions."""
        self._url, self._shard, self._num_shards = database_url, shard, num_shards
        self._config, self._context_dim, self._heads = config, context_dim, dict(heads)
        self._buffers = self._new_buffers()
        self._lock = threading.Lock()  # the load thread swaps the buffers
        self._loaded = False
        self._pending: list[tuple[str, dict[str, np.ndarray]]] = []  # added before the load
        self._restored: dict[str, dict[str, float]] | None = None  # per head, sizes and masses as loaded
        report_memory_every("learning")
        in_background(f"{shard_name(shard)}-load", lambda: retry_until_done(
            f"loading replay shard {shard}", lambda: self._load(rollback=False)))

    def _new_buffers(self) -> dict[str, PrioritizedReplayBuffer]:
        c = self._config
        seed = None if c.seed is None else c.seed + self._shard
        return {head: PrioritizedReplayBuffer(shard_capacity(c.capacity, self._num_shards),
                                              experience_columns(self._context_dim, n_actions), c.alpha,
                                              c.beta0, c.beta_steps, seed=seed)
                for head, n_actions in self._heads.items()}

    def _load(self, rollback: bool) -> dict[str, int]:
        """Swap in the buffers of the latest checkpoint (empty ones when there is none).

        rollback=False (a restart): only if nothing loaded yet, then add what came meanwhile.
        rollback=True (the state restarting): always, dropping what came since; the state adds it again.
        """
        row = run_blocking(self._fetch())
        buffers = self._new_buffers()
        if row is not None:
            try:
                state = codec.decode(row["state"])
                for head, buffer in buffers.items():
                    if head in state:
                        buffer.load_state_dict(state[head])
            except Exception as error:  # a damaged or foreign checkpoint: start empty, learn again
                log.warning("replay shard checkpoint not restored", extra={"shard": self._shard, "error": repr(error)})
                buffers = self._new_buffers()
        with self._lock:
            if self._loaded and not rollback:
                return self._sizes()
            self._buffers, self._loaded = buffers, True
            pending, self._pending = self._pending, []
            if not rollback:
                for head, batch in pending:
                    self._buffers[head].add(batch)
            self._restored = {"sizes": self._sizes(), "masses": self._masses()}
        log.info("replay shard loaded", extra={"shard": self._shard, **self._restored})
        return self._restored["sizes"]

    async def _fetch(self) -> Any:
        async with connection(self._url) as conn:
            return await conn.fetchrow("SELECT state FROM replay_shard_checkpoints WHERE shard = $1", self._shard)

    def _sizes(self) -> dict[str, int]:
        return {head: len(buffer) for head, buffer in self._buffers.items()}

    def _masses(self) -> dict[str, float]:
        return {head: buffer.priority_mass for head, buffer in self._buffers.items()}

    # -- what `RemoteShards` calls ----------------------------------------------------------
    def status(self, head: str) -> tuple[int, float, int]:
        """(size, priority mass, bytes); nothing to sample until the checkpoint is loaded."""
        with self._lock:
            buffer = self._buffers[head]
            return (len(buffer), buffer.priority_mass, buffer.nbytes) if self._loaded else (0, 0.0, buffer.nbytes)

    def draw(self, head: str, count: int) -> ShardDraw:
        with self._lock:
            return draw_from(self._buffers[head], self._shard, count)

    def add(self, head: str, batch: dict[str, np.ndarray]) -> None:
        with self._lock:
            if self._loaded:
                self._buffers[head].add(batch)
            else:
                self._pending.append((head, batch))

    def update_priorities(self, head: str, indices: np.ndarray, insertion_ids: np.ndarray,
                          td_errors: np.ndarray) -> int:
        """0 before the load: the slots sampled belonged to buffers that are gone."""
        with self._lock:
            return self._buffers[head].update_priorities(indices, insertion_ids, td_errors) if self._loaded else 0

    def clear(self, head: str) -> None:
        with self._lock:
            self._buffers[head] = self._buffers[head].emptied()
            self._pending = [(h, batch) for h, batch in self._pending if h != head]

    # -- persistence ---------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, dict[str, float]]:
        """Write every head's buffer now (the learning state calls this as it checkpoints); per head
        the size and priority mass written."""
        with self._lock:
            if not self._loaded:  # never overwrite a checkpoint not read yet with empty buffers
                raise RuntimeError(f"replay shard {self._shard} is still loading its checkpoint")
            sizes = self._sizes()
            written = {"sizes": sizes, "masses": self._masses()}
            blob = codec.encode({head: buffer.state_dict() for head, buffer in self._buffers.items()})
        run_blocking(self._save(sizes, blob))
        return written

    async def _save(self, sizes: Mapping[str, int], blob: bytes) -> None:
        async with connection(self._url) as conn:
            await conn.execute(_SAVE, self._shard, self._num_shards, json.dumps(sizes), blob)

    def restore(self) -> dict[str, int]:
        """Roll back to the latest checkpoint (the learning state restarting); the sizes."""
        return self._load(rollback=True)

    def buffer_state(self, head: str) -> dict[str, Any]:
        """A head's buffer as `state_dict` (for exports)."""
        with self._lock:
            return self._buffers[head].state_dict()

    def describe(self) -> dict[str, Any]:
        """Where it runs and what it holds: for operators and the multi-node test."""
        with self._lock:
            return {"shard": self._shard, "node_id": ray.get_runtime_context().get_node_id(),
                    "pid": os.getpid(), "loaded": self._loaded, "sizes": self._sizes(), "masses": self._masses(),
                    "restored": self._restored}


class RemoteShards(ShardedSampler):
    """One head's replay over the `ReplayShard` actors, each call to all of them in parallel."""

    def __init__(self, shards: Sequence[ray.actor.ActorHandle], head: str, config: LearningConfig) -> None:
        super().__init__(len(shards), config.alpha, EPS, config.beta0,
                         config.beta_steps, seed=config.seed)
        self._shards, self._head = list(shards), head

    def status(self) -> ShardStatus:
        rows = np.array(self._get([shard.status.remote(self._head) for shard in self._shards]), np.float64)
        return ShardStatus(rows[:, 0].astype(np.int64), rows[:, 1], rows[:, 2].astype(np.int64))

    def _draw(self, counts: np.ndarray) -> list[ShardDraw]:
        return self._get([self._shards[s].draw.remote(self._head, int(counts[s])) for s in np.flatnonzero(counts)])

    def _add(self, parts: dict[int, dict[str, np.ndarray]]) -> None:
        self._get([self._shards[s].add.remote(self._head, batch) for s, batch in parts.items()])

    def _update(self, parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
        return sum(self._get([self._shards[s].update_priorities.remote(self._head, *part)
                              for s, part in parts.items()]))

    def clear(self) -> None:
        self._get([shard.clear.remote(self._head) for shard in self._shards])

    @staticmethod
    def _get(calls: list[ray.ObjectRef]) -> list[Any]:
        return ray.get(calls, timeout=CALL_TIMEOUT_S)
