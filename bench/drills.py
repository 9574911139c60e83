"""Fault drills under load: kill the learning actor, kill the control arm's replica, stop PostgreSQL.

Each drill runs against a cluster started the way `dtrag up` starts it (embedded PostgreSQL with
the sample corpus, our own loopback Ray on 127.0.0.1:8500, Serve, the app) with learning on
(`FEATURE_EXPERIENCE_REPLAY=on FEATURE_SOFT_Q_BANDIT=on`), under `--clients` closed-loop clients
that search the sample corpus's judged queries and send each search's judgements as feedback.
The load runs `--before` seconds, then the fault, then `--after` seconds:

- `actor`: checkpoint the `LearningState` actor, note its policy version and replay size, then
  `ray.kill` it with restart. Target: 0 failed searches; it comes back restored from that
  checkpoint (version at least the saved one, replay at least as large).
- `replica`: `ray.kill` one of the control arm's replica actors (Serve starts a new one); the
  arm runs 2 replicas (`DTRAG_PIPELINE_REPLICAS`, unless set), as any arm that must survive
  losing one does, and the load goes on until 1,000 searches. Target: at most 0.5% of searches
  failed, each a JSON 503, none past the request deadline.
- `postgres`: stop the embedded PostgreSQL for `--outage` seconds. Target: failures are JSON
  503s, every failure over within 5 s of its return, none past the deadline, and every search
  answered 200 in the run has its row in `experiences` afterwards.

Every drill also checks each non-200 body: the documented JSON error, without `Traceback`,
`pid=`, escape characters or driver and Ray exception names.

    .venv/bin/python bench/drills.py all [--state-dir /tmp/drills-state]

It prints progress, each drill's checks and latency table, writes `bench/results/drill_NAME.png`
(latency over time, the fault shaded) and a section per drill of `bench/RESULTS.md`, and exits 1
if any check failed.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    Judged,
    Outcome,
    body_problem,
    experiences_recorded,
    learning_load,
    learning_on_environment,
    percentiles_ms,
    relative,
    replace_section,
    request_deadline_s,
    running_cluster,
)
from cluster.actors.start import learning_state  # noqa: E402
from cluster.core.deployments import ARM_CONTROL, INGRESS  # noqa: E402
from cluster.core.vocabulary import Arm  # noqa: E402
from cluster.platform.embedded import server_stopped  # noqa: E402
from cluster.platform.runtime import running_replicas  # noqa: E402
from cluster.platform.serve_config import most_replicas  # noqa: E402
from cluster.platform.settings import Settings  # noqa: E402
from serve_app.app import APP_NAME  # noqa: E402

HTTP_PORT = 8500
METRICS_PORT = 9500
CLIENT_TIMEOUT_S = 60.0  # a request still open by then counts as hanging
RESTORE_TIMEOUT_S = 120.0
REPLICA_FAILURE_BUDGET = 0.005
# A 0.5% budget says something only over enough searches: the load goes on until there are these many.
MIN_SEARCHES = {"replica": 1000}
RECOVERY_TARGET_S = 5.0
PROGRESS_EVERY_S = 5.0


@dataclasses.dataclass(frozen=True)
class Check:
    target: str
    measured: str
    passed: bool


@dataclasses.dataclass
class Drill:
    name: str
    title: str
    outcomes: list[Outcome]
    fault: tuple[float, float]  # seconds since the load began: the fault's start and end
    facts: dict[str, Any]
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def of(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind]

    def phase(self, outcomes: Sequence[Outcome], name: str) -> list[Outcome]:
        start, end = self.fault
        return [o for o in outcomes
                if (name == "before" and o.sent < start) or (name == "during" and start <= o.sent < end)
                or (name == "after" and o.sent >= end)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("drill", choices=[*DRILLS, "all"])
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/drills-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (search, then feedback)")
    parser.add_argument("--before", type=float, default=20.0, help="seconds of load before the fault")
    parser.add_argument("--after", type=float, default=30.0, help="seconds of load after the fault ends")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds PostgreSQL stays stopped")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


# --- the faults (blocking: run on a thread while the load goes on) ---------------------------


def kill_learning_actor(_: Settings, __: argparse.Namespace) -> dict[str, Any]:
    """Checkpoint, kill with restart, and wait until the new instance has loaded its state."""
    actor = learning_state()
    saved_version = ray.get(actor.checkpoint.remote())
    replay_at_checkpoint = ray.get(actor.stats.remote())["replay_size"]
    killed_pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
    killed = time.monotonic()
    ray.kill(actor, no_restart=False)
    deadline = killed + RESTORE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:  # the kill takes effect asynchronously: the dying instance may answer a call or two
            pid, stats = ray.get([actor.__ray_call__.remote(lambda _: os.getpid()), actor.stats.remote()], timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            continue
        if pid != killed_pid and stats["loaded"]:
            return {"saved_version": saved_version, "replay_at_checkpoint": replay_at_checkpoint,
                    "restored_from_version": stats["restored_from_version"],
                    "policy_version": stats["policy_version"], "replay_size": stats["replay_size"],
                    "restore_s": time.monotonic() - killed}
        time.sleep(0.2)
    raise TimeoutError(f"the learning actor did not load its state within {RESTORE_TIMEOUT_S:.0f} s")


def _control_replicas() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#arm_{Arm.CONTROL}#"
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)}


def kill_control_replica(_: Settings, __: argparse.Namespace) -> dict[str, Any]:
    """Kill one of the control arm's replica actors; wait until Serve runs as many as before."""
    replicas = _control_replicas()
    victim = sorted(replicas)[0]
    killed = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = killed + RESTORE_TIMEOUT_S
    while time.monotonic() < deadline:
        current = _control_replicas()
        running = running_replicas(APP_NAME, (ARM_CONTROL,))[ARM_CONTROL]
        # Serve's status lags the kill by seconds: wait for the successor's name, then for it to run.
        if current - replicas and victim not in current and running == len(replicas):
            return {"replicas": len(replicas), "killed": victim.rsplit("#", 1)[1],
                    "replaced_in_s": time.monotonic() - killed}
        time.sleep(0.2)
    raise TimeoutError(f"Serve did not replace the control replica within {RESTORE_TIMEOUT_S:.0f} s")


def stop_postgres(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Stop the embedded server (fast: sessions ended, as when its host crashes) for `--outage` s."""
    started = time.monotonic()
    with server_stopped(settings.state_dir):
        stopped = time.monotonic()
        time.sleep(args.outage)
        restarting = time.monotonic()
    return {"stop_s": stopped - started, "down_s": time.monotonic() - stopped,
            "restart_s": time.monotonic() - restarting}


Fault = Callable[[Settings, argparse.Namespace], dict[str, Any]]
DRILLS: dict[str, tuple[str, Fault]] = {
    "actor": ("Drill: kill the learning actor", kill_learning_actor),
    "replica": ("Drill: kill the control arm's replica", kill_control_replica),
    "postgres": ("Drill: stop PostgreSQL", stop_postgres),
}


# --- running one ------------------------------------------------------------------------------


async def _report_progress(name: str, outcomes: list[Outcome], began: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(PROGRESS_EVERY_S)
        searches = [o for o in outcomes if o.kind == "search"]
        recent = [o.seconds for o in searches if o.done > time.monotonic() - began - PROGRESS_EVERY_S]
        print(f"  {name} t={time.monotonic() - began:5.0f} s  searches {len(searches)}  "
              f"failed {sum(not o.ok for o in searches)}  last {PROGRESS_EVERY_S:.0f} s p95 "
              f"{percentiles_ms(recent)[1]:.0f} ms", flush=True)


async def run_drill(name: str, settings: Settings, url: str, key: str, args: argparse.Namespace) -> Drill:
    title, fault = DRILLS[name]
    print(f"{title}: {args.before:.0f} s of load, the fault, {args.after:.0f} s more", flush=True)
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    began = time.monotonic()
    load = asyncio.create_task(learning_load(url, key, args.clients, stop, outcomes, Judged.sample(), began,
                                             CLIENT_TIMEOUT_S))
    progress = asyncio.create_task(_report_progress(name, outcomes, began, stop))
    try:
        await asyncio.sleep(args.before)
        start = time.monotonic() - began
        facts = await asyncio.to_thread(fault, settings, args)
        end = time.monotonic() - began
        print(f"  {name}: fault over after {end - start:.1f} s: {facts}", flush=True)
        await asyncio.sleep(args.after)
        while sum(o.kind == "search" for o in outcomes) < MIN_SEARCHES.get(name, 0):
            await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(load, progress)
    drill = Drill(name, title, outcomes, (start, end), facts)
    answered = [o.search_id for o in drill.of("search") if o.search_id]
    assert settings.database.url
    drill.facts["experiences_missing"] = len(answered) - await experiences_recorded(settings.database.url, answered)
    drill.checks = judge(drill, request_deadline_s(settings))
    return drill


# --- judging ----------------------------------------------------------------------------------


def judge(drill: Drill, deadline_s: float | None) -> list[Check]:
    searches = drill.of("search")
    failed = [o for o in searches if not o.ok]
    problems = [p for o in drill.outcomes if not o.ok and (p := body_problem(o))]
    checks = [Check("every non-200 body the documented JSON error, no internals",
                    f"{len(problems)} bad" + (f", e.g. {problems[0]}" if problems else ""), not problems)]
    facts = drill.facts
    if drill.name == "actor":
        checks += [
            Check("0 failed searches", f"{len(failed)} of {len(searches)}", not failed),
            Check("restored from the checkpoint taken before the kill",
                  f"saved v{facts['saved_version']}, restored from v{facts['restored_from_version']}, "
                  f"now v{facts['policy_version']}",
                  (facts["restored_from_version"] or -1) >= facts["saved_version"]),
            Check("replay restored (at least as large as at the checkpoint)",
                  f"{facts['replay_at_checkpoint']} -> {facts['replay_size']}",
                  facts["replay_size"] >= facts["replay_at_checkpoint"]),
        ]
        return checks
    not_503 = [o for o in drill.outcomes if not o.ok and o.status != 503]
    checks.append(Check("every failed request (search or feedback) a 503", f"{len(not_503)} other"
                        + (f", e.g. {not_503[0].status}: {not_503[0].body[:80]!r}" if not_503 else ""),
                        not not_503))
    longest = max((o.seconds for o in drill.outcomes), default=0.0)
    if deadline_s is None:
        checks.append(Check(f"none hanging (no deadline configured: none past the client's {CLIENT_TIMEOUT_S:.0f} s)",
                            f"max latency {longest:.2f} s", all(o.status is not None for o in drill.outcomes)))
    else:
        checks.append(Check(f"none past the {deadline_s:g} s deadline", f"max latency {longest:.2f} s",
                            longest <= deadline_s + 0.5))  # the response still has to travel back
    if drill.name == "replica":
        share = len(failed) / max(len(searches), 1)
        checks.append(Check(f"at most {REPLICA_FAILURE_BUDGET:.1%} of searches failed",
                            f"{len(failed)} of {len(searches)} ({share:.2%})", share <= REPLICA_FAILURE_BUDGET))
    if drill.name == "postgres":
        returned = drill.fault[1]
        last_failure = max((o.done for o in drill.outcomes if not o.ok), default=returned)
        recovery = max(0.0, last_failure - returned)
        facts["recovery_s"] = recovery
        checks += [
            Check(f"recovered within {RECOVERY_TARGET_S:g} s of PostgreSQL's return",
                  f"last failure {recovery:.2f} s after", recovery <= RECOVERY_TARGET_S),
            Check("no experience of a successful search lost",
                  f"{facts['experiences_missing']} of {sum(o.ok for o in searches)} missing",
                  facts["experiences_missing"] == 0),
        ]
    return checks


# --- reporting --------------------------------------------------------------------------------


def latency_table(drill: Drill) -> str:
    lines = ["| phase | searches | failed | p50 ms | p95 ms | max ms | feedback | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in ("before", "during", "after"):
        searches, feedback = drill.phase(drill.of("search"), phase), drill.phase(drill.of("feedback"), phase)
        p50, p95, top = percentiles_ms([o.seconds for o in searches])
        lines.append(f"| {phase} | {len(searches)} | {sum(not o.ok for o in searches)} | {p50:.0f} | {p95:.0f} "
                     f"| {top:.0f} | {len(feedback)} | {sum(not o.ok for o in feedback)} |")
    return "\n".join(lines)


def checks_table(drill: Drill) -> str:
    return "\n".join(["| target | measured | |", "|---|---|---|"]
                     + [f"| {c.target} | {c.measured.replace('|', '/')} | {'pass' if c.passed else 'FAIL'} |"
                        for c in drill.checks])


def failures_summary(drill: Drill) -> str:
    """Distinct failure bodies (request ids stripped) with their counts."""
    import collections
    import re

    counts = collections.Counter(
        f"{o.kind} {o.status}: {re.sub(r'[0-9a-f]{32}', '…', o.body)[:160]}" for o in drill.outcomes if not o.ok)
    return "\n".join(f"- {n} x `{text}`" for text, n in counts.most_common(6)) or "- none"


def plot(drill: Drill, deadline_s: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 4.2))
    axis.axvspan(*drill.fault, color="tab:red", alpha=0.15, label="fault")
    for kind, colour, size in (("feedback", "tab:gray", 4), ("search", "tab:blue", 6)):
        ok = [o for o in drill.of(kind) if o.ok]
        axis.scatter([o.sent for o in ok], [o.seconds * 1000 for o in ok], s=size, color=colour,
                     alpha=0.5, label=f"{kind} 200")
    failed = [o for o in drill.outcomes if not o.ok]
    axis.scatter([o.sent for o in failed], [o.seconds * 1000 for o in failed], marker="x", color="tab:red",
                 label=f"failed ({len(failed)})")
    if deadline_s is not None:
        axis.axhline(deadline_s * 1000, color="black", linestyle="--", linewidth=1, label="deadline")
    axis.set(xlabel="seconds since the load began (by send time)", ylabel="latency (ms)", yscale="log",
             title=f"{drill.title}: {'pass' if drill.passed else 'FAIL'}")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def section_body(drill: Drill, settings: Settings, args: argparse.Namespace, png: Path) -> str:
    command = shlex.join([".venv/bin/python", "bench/drills.py", *sys.argv[1:]])
    deadline = request_deadline_s(settings)
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Result: **{'pass' if drill.passed else 'FAIL'}**.

```
{command}
```

{args.clients} closed-loop clients on the sample corpus (search, then that query's graded judgements as
feedback), learning on (`FEATURE_EXPERIENCE_REPLAY=on FEATURE_SOFT_Q_BANDIT=on`), {args.before:.0f} s of load
before the fault, {args.after:.0f} s after it ended; the fault window was {drill.fault[0]:.1f}-{drill.fault[1]:.1f} s.
Request deadline: {f'{deadline:g} s' if deadline else 'none configured'}. Cluster: as `dtrag up` starts it
({most_replicas(settings, ARM_CONTROL)} control replica(s), {most_replicas(settings, INGRESS)} ingress).
Fault details: `{drill.facts}`.

{checks_table(drill)}

Latency of every request by send time (failed ones included):

{latency_table(drill)}

Failures:

{failures_summary(drill)}

Latency over time: `{relative(png)}`.
"""


def run(args: argparse.Namespace) -> list[Drill]:
    """The drills one after another on one cluster (each starts once the last has recovered)."""
    names = list(DRILLS) if args.drill == "all" else [args.drill]
    drills = []
    with running_cluster(args.state_dir, HTTP_PORT, METRICS_PORT, "bench-drills") as (settings, url, key):
        for name in names:
            drill = asyncio.run(run_drill(name, settings, url, key, args))
            png = BENCH / "results" / f"drill_{name}.png"
            plot(drill, request_deadline_s(settings), png)
            replace_section(args.results, f"## {drill.title}", section_body(drill, settings, args, png))
            print(checks_table(drill), latency_table(drill), failures_summary(drill), sep="\n\n", flush=True)
            drills.append(drill)
    return drills


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    learning_on_environment()
    # An arm autoscales from one replica under `dtrag up`; it survives losing one only with a second, pinned.
    os.environ.setdefault("DTRAG_PIPELINE_REPLICAS", "2")
    drills = run(args)
    for drill in drills:
        print(f"{drill.title}: {'pass' if drill.passed else 'FAIL'}")
    return 0 if all(drill.passed for drill in drills) else 1


if __name__ == "__main__":
    sys.exit(main())
