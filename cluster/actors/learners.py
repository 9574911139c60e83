"""Remote learners: a pool of Ray actors that turn a prioritized sample into a model delta and priorities.

`LearnerDriver` keeps one step in flight on each `Learner` of its pool against the
`LearningState` actor, and counts how each ended; the math is `learners.value_model.compute_deltas`,
so a learner is a thin shell. Learners are actors rather than tasks because they live on: a
task that comes every couple of seconds finds its worker process retired (Ray stops idle
workers after about a second) and pays for a new Python process each time, which cost an idle
service more CPU than all its replicas together.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import ray

from cluster.platform.metrics import LearnerMetrics, report_memory_every
from learners.learning_core import LearnerBatch
from learners.value_model import compute_deltas

log = logging.getLogger(__name__)

DRIVER_NAME = "learner_driver"
_IDLE_WAIT_S = 0.2  # after the first step that found nothing to learn
_MAX_IDLE_WAIT_S = 2.0  # doubling up to this while nothing comes: an idle service stays cheap


def learn(state: ray.actor.ActorHandle, head: str, batch: LearnerBatch) -> bool:
    """Compute the update for a head's `batch` and send it back; False when the actor rejected it as stale."""
    delta, td = compute_deltas(batch.snapshot, batch.transitions, batch.weights, batch.gamma)
    return ray.get(state.apply_update.remote(head, delta, batch.indices, batch.insertion_ids, td))


@ray.remote(max_restarts=-1, num_cpus=0)
class Learner:
    """One learner process of the pool."""

    def __init__(self, state: ray.actor.ActorHandle):
        self._state = state
        report_memory_every("learning")

    def step(self, batch_size: int) -> str:
        """One learning step: 'applied', 'stale', or 'idle' (rate limit or too little data)."""
        sampled = ray.get(self._state.sample.remote(batch_size))
        if sampled is None:
            return "idle"
        return "applied" if learn(self._state, *sampled) else "stale"


@ray.remote(max_restarts=-1, num_cpus=0)
class LearnerDriver:
    """Keeps one step in flight on each of `learners` Learner actors, backing off while idle.

    The wait after an idle step doubles from 0.2 s to 2 s, so new feedback is learned from
    within about 2 s, and an idle service is not asked for a batch ten times a second.
    """

    def __init__(self, state: ray.actor.ActorHandle, learners: int, batch_size: int):
        self._pool = [Learner.remote(state) for _ in range(learners)]
        report_memory_every("learning")
        self._batch_size = batch_size
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._last_outcome = ""
        self._metrics = LearnerMetrics()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        in_flight = {learner.step.remote(self._batch_size): learner for learner in self._pool}
        idle_wait = _IDLE_WAIT_S
        while True:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            learner = in_flight.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception as error:  # the actor restarting, a lost call: count, go on
                if self._outcomes["failed"] == 0 or self._last_outcome != "failed":
                    log.warning("learner steps failing (counted as failed until one succeeds): %r", error)
                outcome = "failed"
            self._outcomes[outcome] += 1
            self._last_outcome = outcome
            if outcome == "applied":
                self._metrics.batch_success.inc()
            elif outcome in ("stale", "failed"):
                self._metrics.batch_failure.inc()
            if outcome in ("idle", "failed"):
                time.sleep(idle_wait)
                idle_wait = min(2 * idle_wait, _MAX_IDLE_WAIT_S)
            else:
                idle_wait = _IDLE_WAIT_S
            in_flight[learner.step.remote(self._batch_size)] = learner

    def stats(self) -> dict[str, int]:
        """Counts of learner steps by outcome: applied, stale, idle, failed."""
        return {key: self._outcomes[key] for key in ("applied", "stale", "idle", "failed")}
