"""A replica's copy of the live config (weights, flags, faults) that `RolloutControl` owns.

Each poll names the replica and the version it has, so the control actor can report which
version every replica serves (`GET /api/v1/admin/rollout`, `replicas`): the proof that a
rollback has reached all of them.
"""

from __future__ import annotations

from ray import serve
from ray.actor import ActorHandle

from cluster.core.rollout import LiveConfig
from serve_app.versioned_cache import VersionedCache


def replica_name() -> str:
    """`<deployment>#<replica id>` of the calling Serve replica."""
    replica = serve.get_replica_context().replica_id
    return f"{replica.deployment_id.name}#{replica.unique_id}"


def live_config(control: ActorHandle, refresh_s: float) -> VersionedCache[LiveConfig]:
    """The cache of the live config for this replica; run its `run()` as a background task."""
    name = replica_name()
    return VersionedCache("live config", lambda version: control.live_if_newer.remote(version, name), refresh_s)
