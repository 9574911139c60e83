"""`LearningState`: the named, restartable Ray actor that owns the replay buffers and value models.

Two heads learn side by side, each a `LearningCore` over the same context features: `retrieval`
(what runs after the lexical stage, rewarded by nDCG - lambda x CPU ms) and `answer` (the answer
mode, rewarded by the user's rating of the answer - lambda x CPU ms). It wraps them with
persistence: a checkpoint (the model's parameters as JSON, the whole state in the versioned
`learners.checkpoint` format, never pickle) goes to PostgreSQL on a schedule and on request. The
constructor never touches the database: it serves the default policy and loads, on a thread that
retries until PostgreSQL answers, the latest checkpoint and the rewarded experiences that arrived
after it. A checkpoint that cannot be restored for any reason is skipped and the model is rebuilt
from the recorded rewards. So a killed actor comes back with what it had, less only the updates
since its last checkpoint, and an actor started while the database is down comes up anyway. Another
thread applies the retention settings to the experiences table (`cluster.data.retention`), which
never deletes a row that such a restart would replay.

Replay shards (`learning.replay_shards` > 1): the experiences live in `ReplayShard` actors
(`cluster.actors.replay_shards`) and each head samples across them in proportion to their priority
mass; the value models, their single version and every policy change stay here. A checkpoint writes
the shards' buffers and then this actor's state, with additions held back meanwhile, so both
describe the same moment; a restart of this actor rolls the shards back to it before replaying the
rewards recorded since.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import ray

from cluster.actors.persistence import connection, in_background, retry_until_done
from cluster.actors.replay_shards import SHARD_CHECKPOINT_TIMEOUT_S, RemoteShards
from cluster.data.retention import RetentionPolicy, prune_experiences
from cluster.platform.database import run_blocking, unavailable_on_connection_errors
from cluster.platform.errors import Refused, ServiceUnavailable
from cluster.platform.metrics import LearningMetrics, report_every, report_memory_every
from cluster.platform.settings import LearningSettings, PromotionSettings, RetentionSettings
from learners import candidate as candidates
from learners import checkpoint as codec
from learners.context import FEATURES
from learners.learning_core import LearnerBatch, LearningCore, Policies, RewardedSearch
from learners.off_policy import LoggedSearches
from learners.value_model import ValueDelta

log = logging.getLogger(__name__)

ACTOR_NAME = "learning_state"
_KEEP_CHECKPOINTS = 5


HEADS = ("retrieval", "answer")
PROMOTED_HEAD = "retrieval"  # the head a candidate policy replaces (`learners.candidate`)

# Per head, the rewarded searches recorded after a checkpoint, in the columns of RewardedSearch.
_REWARDED_SINCE = {
    "retrieval": """
SELECT context, action, quality, coalesce(cost_cpu_ms, 0) AS cost, propensity, policy_version, next_context,
       action_quality, action_costs, action_probabilities
FROM experiences
WHERE reward IS NOT NULL AND context IS NOT NULL AND ($1::timestamptz IS NULL OR feedback_at > $1)
ORDER BY feedback_at DESC
LIMIT $2""",
    "answer": """
SELECT context, answer_action AS action, answer_rating AS quality, answer_cost_cpu_ms AS cost,
       answer_propensity AS propensity, policy_version, NULL::real[] AS next_context,
       NULL::double precision[] AS action_quality, NULL::double precision[] AS action_costs,
       answer_probabilities AS action_probabilities
FROM experiences
WHERE answer_reward IS NOT NULL AND ($1::timestamptz IS NULL OR answer_rated_at > $1)
ORDER BY answer_rated_at DESC
LIMIT $2""",
}

# The newest served retrieval searches with a reward: what a candidate is judged on.
_JUDGING_ROWS = """
SELECT context, action, quality, propensity
FROM experiences
WHERE reward IS NOT NULL AND context IS NOT NULL
ORDER BY feedback_at DESC
LIMIT $1"""

_LATEST_OPEN_PROMOTION = """
SELECT id, candidate, replaced_model FROM policy_changes
WHERE change = 'promote' AND undone_by IS NULL AND head = $1
ORDER BY id DESC LIMIT 1"""

_RECORD_CHANGE = """
INSERT INTO policy_changes (change, head, candidate, key_id, forced, policy_version, previous_version,
                            judgement, replaced_model)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)
RETURNING id, at"""


def _load_checkpoint(cores: dict[str, LearningCore], checkpoint: asyncpg.Record) -> bool:
    """Load a stored checkpoint into fresh `cores`; False (cores forgotten) when it cannot be.

    Any failure counts: damaged bytes, another format, another layout or shape. The caller
    then learns again from the recorded rewards.
    """
    try:
        state = codec.decode(checkpoint["replay_state"])
        for name, core in cores.items():
            core.load_state_dict(state[name])
        return True
    except Exception as error:
        log.warning("checkpoint not restored; rebuilding from the recorded rewards",
                    extra={"policy_version": checkpoint["policy_version"], "error": repr(error)})
        for core in cores.values():  # one head may have loaded before the other failed
            core.forget()
        return False


def _version_of(cores: dict[str, LearningCore]) -> int:
    """Changes whenever either head's policy does."""
    return sum(core.model.version for core in cores.values())


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    version: int
    blob: bytes  # every head's whole state, `learners.checkpoint` format
    q_table: dict[str, Any]  # the models for people (JSON)
    stats: dict[str, Any]
    actions: list[str]


def _checkpoint_of(cores: dict[str, LearningCore]) -> _Checkpoint:
    return _Checkpoint(_version_of(cores), codec.encode({name: core.state_dict() for name, core in cores.items()}),
                       {name: core.model_report() for name, core in cores.items()},
                       {name: core.stats() for name, core in cores.items()}, list(cores["retrieval"].actions))


async def _insert_checkpoint(conn: asyncpg.Connection, checkpoint: _Checkpoint) -> None:
    """Store a checkpoint and drop all but the newest `_KEEP_CHECKPOINTS` (in the caller's transaction)."""
    await conn.execute(
        "INSERT INTO q_table_snapshots (policy_version, actions, q_table, replay_state, stats) "
        "VALUES ($1, $2, $3::jsonb, $4, $5::jsonb)",
        checkpoint.version, checkpoint.actions, json.dumps(checkpoint.q_table), checkpoint.blob,
        json.dumps(checkpoint.stats),
    )
    await conn.execute("DELETE FROM q_table_snapshots WHERE id <= (SELECT max(id) FROM q_table_snapshots) - $1",
                       _KEEP_CHECKPOINTS)


@dataclasses.dataclass(frozen=True)
class Head:
    """What a head chooses among, and what it serves until it has learned otherwise."""

    actions: tuple[str, ...]
    default_action: int
    gate_groups: tuple[int, ...] | None = None  # per action (`learners.value_model`); None: one group


@ray.remote(max_restarts=-1, max_task_retries=3, num_cpus=0)
class LearningState:
    """Calls run one at a time (a synchronous actor); a thread checkpoints on a schedule."""

    def __init__(self, database_url: str, settings: LearningSettings, heads: dict[str, Head],
                 retention: RetentionSettings | None = None, promotion: PromotionSettings | None = None,
                 shards: Sequence[ray.actor.ActorHandle] = ()):
        self._url = database_url
        self._shards = list(shards)  # ReplayShard actors; none: each head's replay is a local buffer
        self._settings = settings
        self._promotion = promotion
        self._heads = heads
        self._cores = self._new_cores()  # the default policy until the stored state is loaded
        self._next_head = itertools.cycle(HEADS)  # learners take turns between the heads
        self._lock = threading.Lock()  # the checkpoint and load threads use the cores too
        self._loaded = False
        self._restored_from: int | None = None
        self._metrics = LearningMetrics()
        report_memory_every("learning")
        report_every("learning-gauges", self._publish_now)
        in_background("learning-load", self._load)
        if retention is not None and retention.interval_s > 0:
            policy = RetentionPolicy.from_settings(retention, settings.core.capacity)
            export_dir = Path(retention.export_dir) if retention.export_dir else None
            in_background("learning-retention", lambda: self._prune_every(retention.interval_s, policy, export_dir))

    def _new_cores(self) -> dict[str, LearningCore]:
        return {name: LearningCore(self._heads[name].actions, FEATURES, self._heads[name].default_action,
                                   self._settings.core,
                                   RemoteShards(self._shards, name, self._settings.core) if self._shards else None,
                                   gate_groups=self._heads[name].gate_groups)
                for name in HEADS}

    def _ask_shards(self, method: str, *arguments: Any) -> list[Any]:
        """`method` on every replay shard at once, awaited; none to ask with one local buffer (and
        then no blocking `ray.get`, which Ray warns about in this actor)."""
        if not self._shards:
            return []
        return ray.get([getattr(shard, method).remote(*arguments) for shard in self._shards],
                       timeout=SHARD_CHECKPOINT_TIMEOUT_S)

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        """Restore from the database (retrying while it is down), then checkpoint on a schedule."""
        def restore() -> None:
            self._ask_shards("restore")  # back to the checkpoint below
            run_blocking(self._restore())

        retry_until_done("loading the learning state", restore)
        self._checkpoint_every(self._settings.checkpoint_interval_s)

    async def _restore(self) -> None:
        """Swap in cores rebuilt from the latest checkpoint and the rewards recorded after it.

        They are built aside and swapped in at once; until then callers get the default policy
        (or keep the one they have), and learners are given nothing to learn.
        """
        cores = self._new_cores()
        async with connection(self._url) as conn:
            checkpoint = await conn.fetchrow(
                "SELECT policy_version, replay_state, created_at FROM q_table_snapshots ORDER BY id DESC LIMIT 1")
            if checkpoint is not None and not _load_checkpoint(cores, checkpoint):
                checkpoint = None
            since = None if checkpoint is None else checkpoint["created_at"]
            rows = {name: await conn.fetch(_REWARDED_SINCE[name], since, core.config.capacity)
                    for name, core in cores.items()}
        for name, core in cores.items():
            core.add_searches([RewardedSearch.from_row(row) for row in reversed(rows[name])])
        with self._lock:
            self._cores, self._loaded = cores, True
            self._restored_from = None if checkpoint is None else checkpoint["policy_version"]
            self._publish()
        log.info("learning state loaded", extra={"restored_from_version": self._restored_from})

    def _publish_now(self) -> None:
        with self._lock:
            self._publish()

    def _publish(self) -> None:
        """Set the gauges; also on a timer (`report_every`), so they stay exported while unchanged."""
        policy = self._cores["retrieval"].model.snapshot()
        with contextlib.suppress(ray.exceptions.RayError):  # a replay shard restarting: the gauge keeps its value
            self._metrics.replay_buffer_size.set(sum(len(core.replay) for core in self._cores.values()))
        self._metrics.context_model_active.set(float(policy.gate_open))
        self._metrics.exploration_rate.set(policy.epsilon)

    def _version(self) -> int:
        """Changes whenever either head's policy does."""
        return _version_of(self._cores)

    def add(self, head: str, searches: Sequence[RewardedSearch]) -> int:
        """Learn from rewarded searches (each scores the model first, then enters the replay)."""
        with self._lock:
            size = self._cores[head].add_searches(searches)
            self._publish()
            return size

    def sample(self, batch_size: int) -> tuple[str, LearnerBatch] | None:
        """A batch of the next head that has one to give, and that head's name (none while loading)."""
        with self._lock:
            if not self._loaded:
                return None
            for _ in HEADS:
                head = next(self._next_head)
                batch = self._cores[head].sample(batch_size)
                if batch is not None:
                    return head, batch
            return None

    def apply_update(self, head: str, delta: ValueDelta, indices, insertion_ids, td_errors) -> bool:
        with self._lock:
            applied = self._cores[head].apply_update(delta, indices, insertion_ids, td_errors)
            self._publish()
            return applied

    def policy_if_newer(self, version: int) -> Policies | None:
        """Both heads' policies when their version differs from `version` (cheap to poll), else None.

        While the stored state is loading, a replica that has a policy (version > 0) keeps it and
        a new one gets the default policy.
        """
        with self._lock:
            if self._version() == version or (version > 0 and not self._loaded):
                return None
            return Policies(self._version(), self._cores["retrieval"].policy(), self._cores["answer"].policy())

    def stats(self) -> dict[str, Any]:
        """The retrieval head's counters (the answer head's are in `model`)."""
        with self._lock:
            return {**self._cores["retrieval"].stats(), "policy_version": self._version(),
                    "loaded": self._loaded, "restored_from_version": self._restored_from}

    def model(self) -> dict[str, Any]:
        """Per head: the model's parameters, gate, exploration, counters and its values for the last
        search learned from."""
        with self._lock:
            return {name: {**core.model_report(), "counters": core.stats()} for name, core in self._cores.items()}

    def reset(self) -> int:
        """Forget what was learned, and checkpoint at once so a restart does not replay older rewards."""
        with self._lock:
            self._require_loaded()
            for core in self._cores.values():
                core.forget()
            self._publish()
        return self.checkpoint()

    def checkpoint(self) -> int:
        """Write a checkpoint now (the shards' first); returns the policy version saved."""
        with self._lock:  # held while the shards write: nothing is added to them in between
            self._require_loaded()
            self._ask_shards("checkpoint")
            checkpoint = _checkpoint_of(self._cores)
        run_blocking(self._write_checkpoint(checkpoint))
        return checkpoint.version

    async def _write_checkpoint(self, checkpoint: _Checkpoint) -> None:
        async with connection(self._url) as conn, conn.transaction():
            await _insert_checkpoint(conn, checkpoint)

    # -- promotion (`dtrag policy ...`) --------------------------------------------------------
    def promote(self, blob: bytes, key_id: str, force: bool = False) -> dict[str, Any]:
        """Judge a candidate policy file against the live policy, then serve it.

        Refused when it is estimated worse than the live policy by more than the margin, or when
        too few logged searches can judge it, unless `force`. The change is recorded and
        checkpointed before the new model serves (`_change`), so it is audited, survives a restart
        and can be undone.
        """
        assert self._promotion is not None, "promotion settings are given to actors that promote"
        self._require_loaded()
        candidate = candidates.decode(blob)
        core = self._cores[PROMOTED_HEAD]
        candidate.check_fits(PROMOTED_HEAD, core.actions, core.features)
        model = candidate.value_model(core.config, core.model.default_action, core.model.gate_groups)
        logs = self._judging_logs(core)
        judgement = None
        if len(logs) >= self._promotion.min_rows:
            judgement = candidates.judge(logs, model.snapshot(), core.model.snapshot(), self._promotion.margin)
        if not force and judgement is None:
            raise Refused(f"only {len(logs)} usable rewarded searches ({logs.refused} refused) to judge candidate "
                          f"{candidate.name!r} on; {self._promotion.min_rows} are needed: wait for more feedback, "
                          "or promote with --force")
        if not force and judgement is not None and judgement.worse:
            raise Refused(f"candidate {candidate.name!r} is estimated worse than the live policy: "
                          f"{judgement.difference} beyond the margin {judgement.margin}; promote with --force "
                          "to serve it anyway")
        return self._change("promote", model.state_dict(), key_id, candidate.name, force,
                            None if judgement is None else {**judgement.as_dict(), "rows": len(logs)})

    def rollback_policy(self, key_id: str) -> dict[str, Any]:
        """Undo the latest promotion not undone yet: serve the model it replaced, as a new version."""
        self._require_loaded()
        promotion = run_blocking(self._fetch(_LATEST_OPEN_PROMOTION, PROMOTED_HEAD))
        if not promotion:
            raise Refused("there is no promotion to roll back")
        replaced = codec.decode(promotion[0]["replaced_model"])
        return self._change("rollback", replaced, key_id, promotion[0]["candidate"], False, None,
                            undoes=promotion[0]["id"])

    def _judging_logs(self, core: LearningCore) -> LoggedSearches:
        """The newest rewarded searches, rewarded as the core rewards them (its expected costs)."""
        rows = [row for row in run_blocking(self._fetch(_JUDGING_ROWS, self._promotion.judge_rows))
                if len(row["context"]) == len(core.features)]
        if not rows:
            return LoggedSearches.usable(np.zeros((0, len(core.features))), [], [], [])
        actions = np.array([row["action"] for row in rows])
        rewards = (np.array([row["quality"] for row in rows], np.float64)
                   - core.config.cost_weight * core.expected_cost[actions])
        return LoggedSearches.usable([row["context"] for row in rows], actions,
                                     [row["propensity"] for row in rows], rewards)

    async def _fetch(self, query: str, *arguments: Any) -> list[asyncpg.Record]:
        async with (unavailable_on_connection_errors("judging or undoing a policy change"),
                    connection(self._url) as conn):
            return await conn.fetch(query, *arguments)

    def _change(self, change: str, model_state: dict[str, Any], key_id: str, candidate: str | None,
                forced: bool, judgement: dict[str, Any] | None, undoes: int | None = None) -> dict[str, Any]:
        """Serve `model_state` on the promoted head as a new version: built aside, recorded with a
        checkpoint of the new state in one transaction, then swapped in. A database that fails
        changes nothing (the caller gets a 503). Calls on this actor run one at a time, so no
        learner update lands between the copy and the swap."""
        with self._lock:  # versions of the promoted head: what searches report and experiences record
            previous_version = self._cores[PROMOTED_HEAD].model.version
            replaced = codec.encode(self._cores[PROMOTED_HEAD].model.state_dict())
            cores = self._new_cores()
            for name, core in self._cores.items():
                cores[name].load_state_dict(core.state_dict())
        head = cores[PROMOTED_HEAD]
        head.model.load_state_dict({**model_state, "version": head.model.version + 1})
        checkpoint = _checkpoint_of(cores)
        record = (change, PROMOTED_HEAD, candidate, key_id, forced, head.model.version, previous_version,
                  None if judgement is None else json.dumps(judgement), replaced)
        change_id, at = run_blocking(self._record(record, checkpoint, undoes))  # a 503 when it cannot be
        with self._lock:
            self._cores = cores
            self._publish()
        log.warning("policy %s", change, extra={"candidate": candidate, "key_id": key_id, "forced": forced,
                                                "policy_version": head.model.version})
        return {"change": change, "id": change_id, "at": at.isoformat(), "candidate": candidate,
                "policy_version": head.model.version, "previous_version": previous_version, "forced": forced,
                "judgement": judgement}

    async def _record(self, record: tuple[Any, ...], checkpoint: _Checkpoint, undoes: int | None) -> tuple[int, Any]:
        async with (unavailable_on_connection_errors(f"recording the policy {record[0]} (nothing changed)"),
                    connection(self._url) as conn, conn.transaction()):
            row = await conn.fetchrow(_RECORD_CHANGE, *record)
            if undoes is not None:
                await conn.execute("UPDATE policy_changes SET undone_by = $1 WHERE id = $2", row["id"], undoes)
            await _insert_checkpoint(conn, checkpoint)
            return row["id"], row["at"]

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise ServiceUnavailable("the learning state is still loading from the database; retry when it is up")

    def _checkpoint_every(self, interval_s: float) -> None:
        def progress() -> tuple[int, int]:
            return self._version(), sum(core.inserted for core in self._cores.values())

        last_saved = progress()
        while True:
            time.sleep(interval_s)
            current = progress()
            if current == last_saved:
                continue
            try:
                self.checkpoint()
                last_saved = current
            except Exception:  # keep serving; the next tick retries
                log.exception("checkpoint failed")

    def _prune_every(self, interval_s: float, policy: RetentionPolicy, export_dir: Path | None) -> None:
        """Apply retention to the experiences; it never deletes what `_restore` would replay."""
        async def prune() -> None:
            async with connection(self._url) as conn:
                await prune_experiences(conn, policy, export_dir)

        while True:
            time.sleep(interval_s)
            try:
                run_blocking(prune())
            except Exception:  # keep learning; the next tick retries
                log.exception("pruning experiences failed")

    def export_parquet(self, path: str) -> int:
        """Write the retrieval head's replay to a Parquet file; returns the row count.

        Rows are ordered by shard, then by insertion (ids count within a shard).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        core = self._cores["retrieval"]
        with self._lock:
            states = self._ask_shards("buffer_state", "retrieval") or [core.buffer.state_dict()]
        table = pa.concat_tables([self._replay_table(core, shard, state) for shard, state in enumerate(states)])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return table.num_rows

    @staticmethod
    def _replay_table(core: LearningCore, shard: int, state: dict[str, Any]) -> Any:
        import pyarrow as pa

        filled = state["insertion_id"] >= 0
        has_next = state["has_next"][filled]
        return pa.table({
            "shard": np.full(int(filled.sum()), shard, np.int32),
            "insertion_id": state["insertion_id"][filled],
            "context": list(state["context"][filled]),
            "action": state["action"][filled],
            "strategy": [core.actions[a] for a in state["action"][filled]],
            "reward": state["reward"][filled],
            "propensity": state["propensity"][filled],
            "policy_version": state["policy_version"][filled],
            "next_context": [c if n else None for c, n in zip(state["next_context"][filled], has_next, strict=True)],
            "priority": state["priorities"][: len(filled)][filled],
        }).sort_by("insertion_id")
