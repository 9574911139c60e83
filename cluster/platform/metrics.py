"""Prometheus metrics, exported by Ray on `DTRAG_METRICS_PORT` (names get Ray's `ray_` prefix).

Each process that records builds its own set (metrics objects are per process).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psutil
from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

# The deployment kinds whose memory is alerted on, each with its own threshold (configs/alerts.yml).
MEMORY_KINDS = ("ingress", "arm", "embedder", "learning")
# Well inside RAY_WORKER_TIMEOUT_S (120 s): Ray's metrics agent drops every metric of a worker that
# has reported nothing for that long, so a gauge whose value stands still must still be set again.
REPORT_INTERVAL_S = 15.0


class ProcessMemory:
    """This process's resident memory as `process_rss_mb{kind, pid}`: what the memory alerts judge.

    Ray's own `component_rss_mb` sums every process of one name on a node (two learners read
    as one of twice the size, a replica mid-call as another component), so no per-process
    threshold can be set on it; each process reports itself here instead.
    """

    def __init__(self, kind: str) -> None:
        if kind not in MEMORY_KINDS:
            raise ValueError(f"memory kind {kind!r} is none of {MEMORY_KINDS}")
        self._gauge = Gauge("process_rss_mb", "Resident memory of one process, by deployment kind", ("kind", "pid"))
        self._gauge.set_default_tags({"kind": kind, "pid": str(os.getpid())})
        self._process = psutil.Process()

    def report(self) -> float:
        """Measure and export the resident memory now; returns it in MB (2**20 bytes)."""
        megabytes = self._process.memory_info().rss / 2**20
        self._gauge.set(megabytes)
        return megabytes


def report_every(name: str, report: Callable[[], object], interval_s: float = REPORT_INTERVAL_S) -> None:
    """Call `report` now and then every `interval_s` from a daemon thread (see REPORT_INTERVAL_S)."""

    def loop() -> None:
        while True:
            report()
            time.sleep(interval_s)

    threading.Thread(target=loop, name=name, daemon=True).start()


def report_memory_every(kind: str) -> ProcessMemory:
    """Export this process's memory now and then every REPORT_INTERVAL_S."""
    memory = ProcessMemory(kind)
    report_every(f"memory-{kind}", memory.report)
    return memory


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("arm_requests_total", "Search requests routed to each arm", ("arm",))
        self.errors = Counter("arm_errors_total", "Search requests that failed, by arm", ("arm",))
        self.rollout_weight = Gauge("rollout_weight", "Share of callers routed to each arm", ("arm",))


def embed_batch_size_histogram() -> Histogram:
    """Queries per forward pass of the embedder: near 1 means no batching, so one more replica
    costs a whole model's CPU per query."""
    return Histogram("embed_batch_size", "Queries per forward pass of the embedder", (1, 2, 4, 8, 16, 32, 64))


class ArmMetrics:
    def __init__(self) -> None:
        self.latency = Histogram("pipeline_latency_seconds", "Pipeline time per search",
                                 LATENCY_BOUNDARIES_S, ("arm", "strategy"))
        # A gauge of the replica's running count, so it is exported (as 0) before any drop.
        self.experiences_dropped = Gauge("experiences_dropped_total",
                                         "Served searches not logged (queue full or write failed), per replica",
                                         ("arm", "replica"))
        self.policy_version = Gauge("policy_version", "Policy version a replica acts on", ("arm",))


class AnswerMetrics:
    """Per answer: time by provider and mode, tokens, fallbacks by reason, citations dropped."""

    def __init__(self) -> None:
        self.latency = Histogram("answer_latency_seconds", "Time to compose an answer",
                                 LATENCY_BOUNDARIES_S, ("provider", "mode"))
        self.tokens = Counter("answer_tokens_total", "Provider tokens, by direction (in, out)",
                              ("provider", "direction"))
        self.fallbacks = Counter("answer_fallbacks_total", "Answers that fell back, by reason", ("reason", "mode"))
        self.dropped_citations = Counter("answer_dropped_citations_total",
                                         "Citations of passages the model was not given", ("provider",))

    def record(self, provider: str | None, mode: str, latency_ms: float, input_tokens: int, output_tokens: int,
               fallback: str | None, dropped_citations: int) -> None:
        name = provider or "extractive"
        self.latency.observe(latency_ms / 1000, tags={"provider": name, "mode": mode})
        if input_tokens or output_tokens:
            self.tokens.inc(input_tokens, tags={"provider": name, "direction": "in"})
            self.tokens.inc(output_tokens, tags={"provider": name, "direction": "out"})
        if fallback:
            self.fallbacks.inc(tags={"reason": fallback, "mode": mode})
        if dropped_citations:
            self.dropped_citations.inc(dropped_citations, tags={"provider": name})


class LearningMetrics:
    def __init__(self) -> None:
        self.replay_buffer_size = Gauge("replay_buffer_size", "Experiences in the prioritized replay")
        self.context_model_active = Gauge(
            "context_model_active", "1 while the context model has beaten the pooled choice (its gate is open)")
        self.exploration_rate = Gauge("exploration_rate", "Share of searches the policy explores on")


class LearnerMetrics:
    def __init__(self) -> None:
        self.batch_success = Counter("batch_learning_success_total", "Learner batches applied")
        self.batch_failure = Counter("batch_learning_failure_total",
                                     "Learner batches that failed or were rejected as stale")
