"""The one place the cluster's actors are created; deployments receive their handles via `.bind()`.

Each actor is named and detached in one namespace, so a restarted deployment, `dtrag up` run
again, or a Ray job finds the same instances (`get_if_exists`), and Ray restarts a dead one.
Replay shards (`learning.replay_shards` > 1) are spread over the cluster's nodes, so losing one
node loses at most its shards until Ray restarts them elsewhere from their checkpoints.
"""

from __future__ import annotations

import dataclasses

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import NAMESPACE
from cluster.actors.learners import DRIVER_NAME, LearnerDriver
from cluster.actors.learning_state import ACTOR_NAME as LEARNING_STATE_NAME, Head, LearningState
from cluster.actors.replay_shards import SHARD_PREFIX, ReplayShard, shard_name
from cluster.actors.rollout_control import ACTOR_NAME as ROLLOUT_CONTROL_NAME, RolloutControl
from cluster.core.actions import gate_groups
from cluster.platform.settings import Settings
from learners.context import FEATURES


@dataclasses.dataclass(frozen=True)
class ClusterActors:
    rollout_control: ActorHandle  # RolloutControl
    learning_state: ActorHandle  # LearningState
    learner_driver: ActorHandle  # LearnerDriver
    replay_shards: tuple[ActorHandle, ...] = ()  # ReplayShard, when learning.replay_shards > 1


def _named(name: str) -> dict:
    return {"name": name, "namespace": NAMESPACE, "get_if_exists": True, "lifetime": "detached"}


def learning_heads(settings: Settings) -> dict[str, Head]:
    """What each head of the learning actor chooses among, from the settings."""
    retrieval, answers = settings.retrieval, settings.answers
    return {"retrieval": Head(tuple(action.name for action in retrieval.actions), retrieval.default_action,
                              gate_groups(retrieval.actions)),
            "answer": Head(answers.modes, answers.modes.index(answers.default_learned_mode))}


def _round_robin_over_nodes(count: int) -> list[NodeAffinitySchedulingStrategy]:
    """Actor k on the k-th node alive now, softly: a restart lands on any node that can take it.

    Ray's SPREAD strategy is best effort: it put two of three shards on one node of three.
    """
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    return [NodeAffinitySchedulingStrategy(nodes[k % len(nodes)], soft=True) for k in range(count)]


def start_actors(settings: Settings) -> ClusterActors:
    """Create the actors, or find the running ones; `settings.database.url` must be resolved."""
    url = settings.database.url
    assert url, "the database URL is resolved before the actors start"
    learning = settings.learning
    heads = learning_heads(settings)
    shards = () if learning.replay_shards == 1 else tuple(
        ReplayShard.options(**_named(shard_name(k)), scheduling_strategy=placement).remote(
            url, k, learning.replay_shards, learning.core, len(FEATURES),
            {name: len(head.actions) for name, head in heads.items()})
        for k, placement in enumerate(_round_robin_over_nodes(learning.replay_shards)))
    learning_state = LearningState.options(**_named(LEARNING_STATE_NAME)).remote(
        url, learning, heads, settings.retention, settings.promotion, shards)
    return ClusterActors(
        rollout_control=RolloutControl.options(**_named(ROLLOUT_CONTROL_NAME)).remote(
            url, settings.rollout.plan, settings.features, settings.environment == "test"),
        learning_state=learning_state,
        learner_driver=LearnerDriver.options(**_named(DRIVER_NAME)).remote(
            learning_state, learning.learners, learning.batch_size),
        replay_shards=shards,
    )


def learning_state() -> ActorHandle:
    """The running LearningState (for jobs and drills); ValueError when it was not started."""
    return ray.get_actor(LEARNING_STATE_NAME, namespace=NAMESPACE)


def stop_actors() -> None:
    """Kill the actors for good (no restart); absent ones are skipped."""
    shards = sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                    if actor["namespace"] == NAMESPACE and actor["name"].startswith(SHARD_PREFIX))
    for name in (DRIVER_NAME, LEARNING_STATE_NAME, *shards, ROLLOUT_CONTROL_NAME):  # users first
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
