"""Rollout: how callers are split between the arms, and how fast a flag flip or a rollback reaches
every replica while the service is under load.

One Serve app on a local, loopback-only Ray, on the sample corpus, with 2 ingress replicas and 2
replicas per arm (control and treatment), so that "every replica" means more than one; Ray is
given 4 logical CPUs so they all fit on a 2-core machine. The shipped rollout plan and its guard
are in force; fault injection is not (ENVIRONMENT must not be "test").

1. Split and stickiness. The treatment weight is set to 10% and each of `--users` distinct
   callers (`X-User-Id`) sends one search. Reported: the treatment share (target: within 2
   percentage points of 10%), whether every caller got the arm `serve_app.router.choose_arm`
   gives it, and, for a sample of callers sent again several times, whether each always got the
   same arm. The weight is then raised to 50% and every caller searches again: every caller who
   had the treatment must still have it.
2. Propagation under load. `--concurrency` closed-loop clients search as mixed callers while
   the treatment flag `soft_q_bandit` is flipped `--flips` times and the treatment is rolled back
   `--rollbacks` times (each after setting it to 50% again), `--gap` seconds apart. Each search
   response carries `config_version`, the live-config version the arm replica acted on; each
   admin response gives the version the change created. A flip's propagation is the latest send
   time, after the PUT returned, of a search answered with an older version (0 if none); a
   rollback's is the latest send time, after the POST returned, of a search answered by the
   treatment. Target: under 1 s for every change, and no failed request (anything but a 200)
   in the whole run.

The state folder's embedded database is used; if it holds no documents, the sample corpus is
ingested first. Serve listens on 127.0.0.1:8400 and Ray's metrics exporter on 127.0.0.1:9400:

    .venv/bin/python bench/rollout.py [--state-dir /tmp/rollout-state] [--users 2000] [--flips 6]

It prints the tables, writes `bench/results/rollout_propagation.png` and the section
"## Rollout: split and propagation" of `bench/RESULTS.md`, and exits 1 if a target is missed
or a request failed. Every phase is bounded in count and time; Ray, Serve and the database
stop before it exits.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import ray  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    admin,
    deploy_app,
    local_settings,
    prepare_database,
    ray_serve,
    relative,
    replace_section,
    revoke,
)
from cluster.core.deployments import ARM_CONTROL, ARM_TREATMENT, INGRESS  # noqa: E402
from cluster.core.vocabulary import Arm, FeatureFlags, Flag  # noqa: E402
from cluster.data.beir import load_queries  # noqa: E402
from cluster.data.corpus import sample_corpus_dir  # noqa: E402
from cluster.platform.database import resolve_database_url  # noqa: E402
from cluster.platform.settings import Settings, load_settings  # noqa: E402
from serve_app.app import APP_NAME  # noqa: E402
from serve_app.router import choose_arm  # noqa: E402

SECTION = "## Rollout: split and propagation"
HTTP_PORT = 8400
METRICS_PORT = 9400
REPLICAS = 2  # ingress replicas, and replicas of each arm
RAY_CPUS = 4  # logical CPUs: 2 ingress + 4 arm replicas (0.25 each) + the embedder (1) need 2.5
SPLIT_WEIGHT = 0.1
RAISED_WEIGHT = 0.5
SHARE_TOLERANCE = 0.02
PROPAGATION_TARGET_S = 1.0
FLAG = Flag.SOFT_Q_BANDIT
FINAL_TOPK = 3
REQUEST_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 300.0
SEARCH_PATH = "/api/v1/search/"
FLAGS_PATH = "/api/v1/admin/flags"
ROLLOUT_PATH = "/api/v1/admin/rollout"
ARM_COLORS = {Arm.CONTROL: "tab:blue", Arm.TREATMENT: "tab:orange"}
ROUTED = (INGRESS, ARM_CONTROL, ARM_TREATMENT)  # the deployments with REPLICAS replicas
SERVE_REQUESTS = "ray_serve_deployment_request_counter_total"  # Serve's own, by deployment and replica
METRICS_SETTLE_S = 30.0  # Ray exports metrics every few seconds


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/rollout-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--users", type=int, default=2000, help="distinct callers in the split")
    parser.add_argument("--repeat-users", type=int, default=200, help="callers sent again, to show stickiness")
    parser.add_argument("--repeats", type=int, default=3, help="extra searches per repeated caller")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--flips", type=int, default=6, help="flag flips under load (on, off, ...)")
    parser.add_argument("--rollbacks", type=int, default=3, help="rollbacks under load, each after 50%%")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between changes under load")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after a weight change before the split is measured")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="searches not sent by then count as failed; the load stops")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "rollout_propagation.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def bench_settings(state_dir: Path) -> Settings:
    """Our own Ray on 8400/9400, 2 replicas of the ingress and of each arm, 4 logical CPUs."""
    base = local_settings(load_settings(), HTTP_PORT, METRICS_PORT)
    if base.environment == "test":
        raise SystemExit("ENVIRONMENT=test turns fault injection on; run the benchmark in another environment")
    settings = dataclasses.replace(
        base,
        ray=dataclasses.replace(base.ray, num_cpus=RAY_CPUS),
        serve=dataclasses.replace(base.serve, ingress_replicas=REPLICAS, pipeline_replicas=REPLICAS,
                                  embedder_replicas=1),  # fixed, as RAY_CPUS counts it
        rollout=dataclasses.replace(base.rollout, treatment_replicas=REPLICAS),
    )
    return settings.with_database_url(resolve_database_url(None, state_dir))


# --- searches ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """One search: who sent it, when (`time.perf_counter()`), and which arm and config answered."""

    user: str
    sent: float
    received: float
    arm: str | None  # None when it failed
    config_version: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


async def search(client: httpx.AsyncClient, user: str, query: str) -> Reply:
    sent = time.perf_counter()
    try:
        response = await client.post(SEARCH_PATH, json={"q": query, "final_topk": FINAL_TOPK},
                                     headers={"X-User-Id": user})
    except httpx.HTTPError as error:
        return Reply(user, sent, time.perf_counter(), None, None, f"{type(error).__name__}: {error}")
    received = time.perf_counter()
    if response.status_code != 200:
        return Reply(user, sent, received, None, None, f"HTTP {response.status_code}: {response.text[:200]}")
    try:
        body = response.json()
        return Reply(user, sent, received, body["arm"], int(body["config_version"]), None)
    except (ValueError, KeyError) as error:
        return Reply(user, sent, received, None, None, f"malformed response body: {error!r}")


async def closed_loop(client: httpx.AsyncClient, work: Iterator[tuple[str, str]], concurrency: int,
                      deadline: float, progress: tqdm | None = None) -> list[Reply]:
    """`concurrency` clients, each sending its next (user, query) as soon as its last is answered.

    Work taken after `deadline` (a `time.monotonic()` value) is not sent and counts as failed.
    """
    replies: list[Reply] = []

    async def client_loop() -> None:
        for user, query in work:  # shared: clients take turns, and asyncio never preempts next()
            if time.monotonic() > deadline:
                now = time.perf_counter()
                replies.append(Reply(user, now, now, None, None, "not sent: time limit reached"))
            else:
                replies.append(await search(client, user, query))
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return replies


async def search_as(client: httpx.AsyncClient, users: Sequence[str], queries: Sequence[str],
                    args: argparse.Namespace, deadline: float, label: str) -> list[Reply]:
    """One search per entry of `users`, queries cycled, with a progress bar."""
    with tqdm(total=len(users), desc=label, unit="req") as progress:
        return await closed_loop(client, zip(users, itertools.cycle(queries)), args.concurrency,
                                 deadline, progress)


# --- 1. split and stickiness ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Which arm served each caller at one treatment weight."""

    weight: float
    arms: dict[str, str]  # caller -> arm, answered callers only

    @classmethod
    def of(cls, weight: float, replies: Sequence[Reply]) -> Split:
        return cls(weight, {r.user: r.arm for r in replies if r.arm is not None})

    @property
    def treatment(self) -> set[str]:
        return {user for user, arm in self.arms.items() if arm == Arm.TREATMENT}

    @property
    def share(self) -> float:
        return len(self.treatment) / len(self.arms) if self.arms else float("nan")

    def off_router(self) -> list[str]:
        """Callers served by another arm than `choose_arm` gives them at this weight."""
        return [user for user, arm in self.arms.items() if arm != choose_arm(user, {Arm.TREATMENT: self.weight})]


@dataclasses.dataclass(frozen=True)
class SplitResult:
    first: Split  # at SPLIT_WEIGHT
    repeat_arms: dict[str, set[str]]  # sampled caller -> every arm that served it at SPLIT_WEIGHT
    repeat_requests: int
    raised: Split  # at RAISED_WEIGHT
    replies: list[Reply]  # every search of this phase

    @property
    def searches_per_sampled(self) -> int:
        """The first search of a sampled caller, plus its repeats."""
        return 1 + (self.repeat_requests // len(self.repeat_arms) if self.repeat_arms else 0)

    @property
    def unsteady(self) -> list[str]:
        """Sampled callers served by more than one arm at the same weight."""
        return [user for user, arms in self.repeat_arms.items() if len(arms) > 1]

    @property
    def kept(self) -> set[str]:
        """Treatment callers at SPLIT_WEIGHT still on the treatment at RAISED_WEIGHT."""
        return self.first.treatment & self.raised.treatment



async def set_weight(admin_client: httpx.Client, weight: float, settle_s: float) -> None:
    """Set the treatment's share, then give every ingress replica time to pick it up."""
    await asyncio.to_thread(admin, admin_client, "PUT", f"{ROLLOUT_PATH}/weight", {"treatment_weight": weight})
    await asyncio.sleep(settle_s)


async def measure_split(client: httpx.AsyncClient, admin_client: httpx.Client, users: Sequence[str],
                        queries: Sequence[str], args: argparse.Namespace, deadline: float) -> SplitResult:
    await set_weight(admin_client, SPLIT_WEIGHT, args.settle)
    first = await search_as(client, users, queries, args, deadline, f"split at {SPLIT_WEIGHT:.0%}")
    sample = random.Random(0).sample(list(users), min(args.repeat_users, len(users)))
    again = await search_as(client, sample * args.repeats, queries, args, deadline, "same callers again")
    repeat_arms: dict[str, set[str]] = {user: set() for user in sample}
    for reply in (*first, *again):
        if reply.user in repeat_arms and reply.arm is not None:
            repeat_arms[reply.user].add(reply.arm)
    await set_weight(admin_client, RAISED_WEIGHT, args.settle)
    raised = await search_as(client, users, queries, args, deadline, f"split at {RAISED_WEIGHT:.0%}")
    return SplitResult(Split.of(SPLIT_WEIGHT, first), repeat_arms, len(again),
                       Split.of(RAISED_WEIGHT, raised), [*first, *again, *raised])


# --- 2. propagation under load ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Action:
    """An admin call made under load."""

    kind: str  # "flag", "raise" or "rollback"
    label: str
    method: str
    path: str
    body: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Change:
    """An admin call as made: when it was sent and returned, and the version it created."""

    action: Action
    requested: float  # time.perf_counter()
    returned: float
    version: int
    until: float = math.inf  # when the next change was sent: the end of this one's window


def schedule(flips: int, rollbacks: int, flag_default: bool) -> list[Action]:
    """Flag flips (away from the default, back, ...), then rollbacks, each after setting 50% again."""
    values = ((i % 2 == 0) != flag_default for i in range(flips))
    flag = [Action("flag", f"{FLAG} {'on' if on else 'off'}", "PUT", FLAGS_PATH,
                   {"arm": Arm.TREATMENT, "flags": {FLAG: on}}) for on in values]
    cycle = [Action("raise", f"treatment {RAISED_WEIGHT:.0%}", "PUT", f"{ROLLOUT_PATH}/weight",
                    {"treatment_weight": RAISED_WEIGHT}),
             Action("rollback", "rollback", "POST", f"{ROLLOUT_PATH}/rollback", {"reason": "bench/rollout.py"})]
    return flag + cycle * rollbacks


def timed_change(admin_client: httpx.Client, action: Action) -> Change:
    """Make the admin call (in a worker thread, so the clock is read as soon as it returns)."""
    requested = time.perf_counter()
    body = admin(admin_client, action.method, action.path, action.body)
    return Change(action, requested, time.perf_counter(), int(body["version"]))


async def drive_changes(admin_client: httpx.Client, actions: Sequence[Action], gap_s: float) -> list[Change]:
    """Each action `gap_s` after the last (the first after `gap_s` of load alone)."""
    changes: list[Change] = []
    for action in tqdm(actions, desc="changes under load", unit="change"):
        await asyncio.sleep(gap_s)
        changes.append(await asyncio.to_thread(timed_change, admin_client, action))
    await asyncio.sleep(gap_s)
    ends = [later.requested for later in changes[1:]] + [math.inf]
    return [dataclasses.replace(change, until=end) for change, end in zip(changes, ends, strict=True)]


async def measure_propagation(client: httpx.AsyncClient, admin_client: httpx.Client, users: Sequence[str],
                              queries: Sequence[str], args: argparse.Namespace, deadline: float,
                              flag_default: bool) -> tuple[list[Change], list[Reply]]:
    """Closed-loop load as mixed callers while the scheduled changes are made."""
    stop = asyncio.Event()
    mixed = random.Random(1).sample(list(users), len(users))
    work = itertools.takewhile(lambda _: not stop.is_set() and time.monotonic() < deadline,
                               zip(itertools.cycle(mixed), itertools.cycle(queries)))
    load = asyncio.create_task(closed_loop(client, work, args.concurrency, math.inf))
    try:
        changes = await drive_changes(admin_client, schedule(args.flips, args.rollbacks, flag_default), args.gap)
    finally:
        stop.set()
        replies = await load
    return changes, replies


@dataclasses.dataclass(frozen=True)
class Propagation:
    change: Change
    stale: int  # searches sent in the change's window and answered as before the change
    seconds: float  # latest send time of a stale one after the change returned; 0 if none
    observed: bool  # the new state was seen taking effect, so the measurement is not vacuous


def window(change: Change, replies: Sequence[Reply]) -> list[Reply]:
    return [r for r in replies if r.ok and change.returned <= r.sent < change.until]


def propagation(change: Change, replies: Sequence[Reply], is_stale: Callable[[Reply], bool],
                observed: bool) -> Propagation:
    stale = [r for r in window(change, replies) if is_stale(r)]
    return Propagation(change, len(stale), max((r.sent - change.returned for r in stale), default=0.0), observed)


def flag_propagation(change: Change, replies: Sequence[Reply]) -> Propagation:
    """Searches answered with a config older than the flip's; seen if the treatment answered with it."""
    seen = any(r.arm == Arm.TREATMENT and r.config_version >= change.version for r in window(change, replies))
    return propagation(change, replies, lambda r: r.config_version < change.version, seen)


def rollback_propagation(before: Change, change: Change, replies: Sequence[Reply]) -> Propagation:
    """Searches answered by the treatment; seen if the treatment answered after the change `before`."""
    seen = any(r.arm == Arm.TREATMENT for r in window(before, replies))
    return propagation(change, replies, lambda r: r.arm == Arm.TREATMENT, seen)


# --- what ran ---------------------------------------------------------------------------------


def running_replicas() -> dict[str, int]:
    """RUNNING replicas per deployment of the app, from Serve's controller."""
    deployments = serve.status().applications[APP_NAME].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
            for name, d in deployments.items()}


ReplicaCounts = collections.Counter[tuple[str, str]]  # (deployment, replica) -> searches handled


def served_searches(metrics_url: str) -> ReplicaCounts:
    """Searches each ingress and arm replica has handled so far, from Serve's counter on Ray's exporter."""
    counts: ReplicaCounts = collections.Counter()
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == SERVE_REQUESTS and labels.get("route") == SEARCH_PATH and labels["deployment"] in ROUTED:
                counts[(labels["deployment"], labels["replica"])] += int(sample.value)
    return counts


def settled_searches(metrics_url: str, answered: int) -> ReplicaCounts:
    """`served_searches` once the ingress, and the two arms together, count `answered` (or time runs out)."""
    deadline = time.monotonic() + METRICS_SETTLE_S
    while True:
        counts = served_searches(metrics_url)
        ingress = sum(n for (name, _), n in counts.items() if name == INGRESS)
        if min(ingress, counts.total() - ingress) >= answered or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def guard_rollbacks(status: dict[str, Any], since: float) -> list[str]:
    """Rollbacks the guard made by itself since `since` (a `time.time()` value)."""
    return [e["event"] for e in status["events"] if e["at"] >= since and "guard:" in e["event"]]


@dataclasses.dataclass(frozen=True)
class Run:
    split: SplitResult
    changes: list[Change]
    load: list[Reply]
    flags: list[Propagation]
    rollbacks: list[Propagation]
    replicas: dict[str, int]
    under_load: ReplicaCounts  # searches each replica handled during the propagation phase
    guard: list[str]

    @property
    def failures(self) -> list[str]:
        return [r.error for r in (*self.split.replies, *self.load) if r.error is not None]


async def measure(url: str, metrics_url: str, key: str, defaults: FeatureFlags,
                  args: argparse.Namespace) -> tuple[SplitResult, list[Change], list[Reply], ReplicaCounts]:
    """Both arms reset to the default flags (state from an earlier run is restored), then both phases."""
    users = [f"rollout-user-{i:05d}" for i in range(args.users)]
    queries = list(load_queries(sample_corpus_dir()).values())
    deadline = time.monotonic() + args.max_seconds
    headers = {"X-API-Key": key}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as admin_client:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S,
                                     limits=limits) as client:
            for arm in (Arm.CONTROL, Arm.TREATMENT):
                await asyncio.to_thread(admin, admin_client, "PUT", FLAGS_PATH, {"arm": arm, "flags": defaults.as_dict()})
            split = await measure_split(client, admin_client, users, queries, args, deadline)
            answered = sum(r.ok for r in split.replies)
            before = await asyncio.to_thread(settled_searches, metrics_url, answered)
            changes, load = await measure_propagation(client, admin_client, users, queries, args, deadline,
                                                      defaults.is_on(FLAG))
            after = await asyncio.to_thread(settled_searches, metrics_url, answered + sum(r.ok for r in load))
    return split, changes, load, after - before


def run(settings: Settings, key: str, args: argparse.Namespace) -> Run:
    started = time.time()
    metrics_url = f"http://127.0.0.1:{settings.ray.metrics_port}/metrics"
    with ray_serve(settings) as url:
        deploy_app(settings, url, HEALTH_TIMEOUT_S)
        replicas = running_replicas()
        split, changes, load, under_load = asyncio.run(measure(url, metrics_url, key, settings.features, args))
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=REQUEST_TIMEOUT_S) as client:
            status = admin(client, "GET", ROLLOUT_PATH)
    flags = [flag_propagation(c, load) for c in changes if c.action.kind == "flag"]
    rollbacks = [rollback_propagation(before, c, load)
                 for before, c in itertools.pairwise(changes) if c.action.kind == "rollback"]
    return Run(split, changes, load, flags, rollbacks, replicas, under_load, guard_rollbacks(status, started))


# --- verdicts and reporting -------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def max_seconds(propagations: Sequence[Propagation]) -> float:
    return max((p.seconds for p in propagations), default=float("nan"))


def propagation_ok(propagations: Sequence[Propagation]) -> bool:
    return bool(propagations) and all(p.observed and p.seconds < PROPAGATION_TARGET_S for p in propagations)


def summary_rows(run: Run) -> list[tuple[str, str, str, bool | None]]:
    """(measure, result, target, met) per line; met None for figures without a target."""
    s, first, raised = run.split, run.split.first, run.split.raised
    repeat_ok = not s.unsteady and all(s.repeat_arms.values())
    load_seconds = max(r.received for r in run.load) - min(r.sent for r in run.load) if run.load else 0.0
    answered = [r for r in run.load if r.ok]
    return [
        (f"treatment share at {first.weight:.0%} ({len(first.arms):,} callers)",
         f"{first.share:.2%} ({len(first.treatment)})", f"{first.weight:.0%} ± {SHARE_TOLERANCE * 100:.0f} pp",
         abs(first.share - first.weight) <= SHARE_TOLERANCE),
        (f"callers on `choose_arm`'s arm at {first.weight:.0%}", f"{len(first.arms) - len(first.off_router()):,}"
         f" / {len(first.arms):,}", "all", not first.off_router()),
        (f"sampled callers always on one arm ({len(s.repeat_arms)} callers, {s.searches_per_sampled} searches each)",
         f"{len(s.repeat_arms) - len(s.unsteady)} / {len(s.repeat_arms)}", "all", repeat_ok),
        (f"treatment share at {raised.weight:.0%} ({len(raised.arms):,} callers)",
         f"{raised.share:.2%} ({len(raised.treatment)})", "", None),
        (f"callers on `choose_arm`'s arm at {raised.weight:.0%}", f"{len(raised.arms) - len(raised.off_router()):,}"
         f" / {len(raised.arms):,}", "all", not raised.off_router()),
        (f"treatment callers at {first.weight:.0%} still on it at {raised.weight:.0%}",
         f"{len(s.kept)} / {len(first.treatment)}", "all", s.kept == first.treatment),
        (f"control callers at {first.weight:.0%} moved to treatment at {raised.weight:.0%}",
         f"{len(raised.treatment - first.treatment)}", "", None),
        (f"`{FLAG}` flip propagation, max of {len(run.flags)}", f"{max_seconds(run.flags):.3f} s",
         f"< {PROPAGATION_TARGET_S:.0f} s", propagation_ok(run.flags)),
        (f"rollback propagation, max of {len(run.rollbacks)}", f"{max_seconds(run.rollbacks):.3f} s",
         f"< {PROPAGATION_TARGET_S:.0f} s", propagation_ok(run.rollbacks)),
        (f"searches under load ({len(run.changes)} changes, {load_seconds:.0f} s)",
         f"{len(run.load):,} ({len(answered) / load_seconds if load_seconds else 0:.1f}/s)", "", None),
        ("failed searches (not 200), whole run", f"{len(run.failures)} of {len(run.split.replies) + len(run.load):,}",
         "0", not run.failures),
    ]


def summary_table(run: Run) -> str:
    lines = ["| measure | result | target | verdict |", "|---|---:|---|---|"]
    for label, result, target, met in summary_rows(run):
        lines.append(f"| {label} | {result} | {target} | {'' if met is None else verdict(met)} |")
    return "\n".join(lines)


def changes_table(run: Run) -> str:
    """One line per change under load, in order, with its propagation where one is measured."""
    measured = {p.change.requested: p for p in (*run.flags, *run.rollbacks)}
    start = min(r.sent for r in run.load)
    lines = ["| # | change | version | returned at (s) | admin call (ms) | searches in window | "
             "stale answers | propagation (s) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, change in enumerate(run.changes, 1):
        p = measured.get(change.requested)
        answered = len(window(change, run.load))
        stale, seconds = ("", "") if p is None else (str(p.stale), f"{p.seconds:.3f}" + ("" if p.observed else
                                                                                          " (not observed)"))
        lines.append(f"| {i} | {change.action.label} | {change.version} | {change.returned - start:.2f} | "
                     f"{(change.returned - change.requested) * 1000:.0f} | {answered} | {stale} | {seconds} |")
    return "\n".join(lines)


def problems(run: Run) -> list[str]:
    found = [f"{m}: {result} (target {target})" for m, result, target, met in summary_rows(run) if met is False]
    found += [f"{p.change.action.label} (version {p.change.version}): the new state was never seen"
              for p in (*run.flags, *run.rollbacks) if not p.observed]
    found += [f"the guard rolled back by itself: {event}" for event in run.guard]
    short = {name: run.replicas.get(name, 0) for name in ROUTED if run.replicas.get(name, 0) < REPLICAS}
    if short:
        found.append(f"fewer than {REPLICAS} replicas running: {short}")
    busy = collections.Counter(name for name, _ in run.under_load)
    idle = {name: busy[name] for name in ROUTED if busy[name] < REPLICAS}
    if idle:
        found.append(f"fewer than {REPLICAS} replicas served searches under load: {idle}")
    return found


def replica_counts(counts: ReplicaCounts) -> str:
    """`deployment: replica n, replica n; ...` in deployment order."""
    by_deployment: dict[str, list[str]] = collections.defaultdict(list)
    for (name, replica), n in sorted(counts.items()):
        by_deployment[name].append(f"`{replica}` {n:,}")
    return "; ".join(f"{name}: {', '.join(entries)}" for name, entries in sorted(by_deployment.items()))


def plot(run: Run, path: Path) -> None:
    """The whole load (config_version by send time, by arm), then the slowest flip and rollback up close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    answered = [r for r in run.load if r.ok]
    start = min(r.sent for r in run.load)
    figure, (timeline, flip, rollback) = plt.subplots(3, 1, figsize=(12, 12))
    for arm, color in ARM_COLORS.items():
        mine = [r for r in answered if r.arm == arm]
        timeline.scatter([r.sent - start for r in mine], [r.config_version for r in mine], s=5, color=color, label=arm)
    for change in run.changes:
        timeline.axvline(change.returned - start, color="grey", linestyle=":", linewidth=1)
        timeline.annotate(change.action.label, (change.returned - start, 1.0), xycoords=("data", "axes fraction"),
                          rotation=90, va="top", ha="right", fontsize=7)
    timeline.set(xlabel="send time (s since the load started)", ylabel="config_version answered",
                 title=f"{len(run.load):,} searches from {len(set(r.user for r in run.load)):,} callers under "
                       "closed-loop load; dotted: admin call returned")
    timeline.legend(loc="lower right")
    timeline.yaxis.set_major_locator(MaxNLocator(integer=True))
    if run.flags:
        _zoom(flip, max(run.flags, key=lambda p: p.seconds), answered,
              lambda r: r.config_version, "config_version answered")
        flip.yaxis.set_major_locator(MaxNLocator(integer=True))
    if run.rollbacks:
        jitter = random.Random(0)
        _zoom(rollback, max(run.rollbacks, key=lambda p: p.seconds), answered,
              lambda r: (r.arm == Arm.TREATMENT) + jitter.uniform(-0.3, 0.3), "arm (jittered)")
        rollback.set_yticks([0, 1], [Arm.CONTROL, Arm.TREATMENT])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _zoom(axis: Any, slowest: Propagation, answered: Sequence[Reply], y: Callable[[Reply], float],
          ylabel: str) -> None:
    """Searches from 1.5 s before the change to the end of its window, by send time and `y`."""
    change = slowest.change
    near = [r for r in answered if change.returned - 1.5 <= r.sent < change.until]
    for arm, color in ARM_COLORS.items():
        mine = [r for r in near if r.arm == arm]
        axis.scatter([r.sent - change.returned for r in mine], [y(r) for r in mine], s=8, color=color, label=arm)
    axis.axvspan(change.requested - change.returned, 0, color="grey", alpha=0.3, label="admin call in flight")
    axis.axvline(slowest.seconds, color="red", linestyle="--",
                 label=f"propagation {slowest.seconds:.3f} s (last stale send)")
    axis.set(xlabel=f"send time relative to the return of '{change.action.label}' (s)", ylabel=ylabel,
             title=f"Slowest {change.action.kind}: '{change.action.label}' -> version {change.version}")
    axis.legend(loc="center right", fontsize=8)


def section_body(run: Run, settings: Settings, args: argparse.Namespace, loads: tuple[float, float],
                 seconds: float) -> str:
    command = shlex.join([".venv/bin/python", "bench/rollout.py", *sys.argv[1:]])
    replicas = ", ".join(f"{name} {n}" for name, n in sorted(run.replicas.items()))
    flips = ", ".join(f"{p.seconds:.3f}" for p in run.flags)
    rollbacks = ", ".join(f"{p.seconds:.3f}" for p in run.rollbacks)
    found = problems(run)
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores, Python
{sys.version.split()[0]}, Ray {ray.__version__}; the run took {seconds:.0f} s. 1-minute load average
{loads[0]:.1f} at the start, {loads[1]:.1f} at the end.

```
{command}
```

One Serve app on a local loopback Ray, on the sample corpus, ENVIRONMENT `{settings.environment}` (no
fault injection), both arms reset to the default flags first, the shipped rollout plan and guard in
force, replicas polling the live config every
{settings.rollout.live_refresh_s} s. Replicas running: {replicas}; the benchmark sets
`serve.ingress_replicas` (`DTRAG_INGRESS_REPLICAS`), `serve.pipeline_replicas` (control) and
`rollout.treatment_replicas` to {REPLICAS}.
Ray was given {settings.ray.num_cpus} logical CPUs on this {os.cpu_count()}-core machine so that every replica
fits (each ingress and arm replica asks for 0.25 CPU, the embedder for 1): the replicas share the
physical cores. Searches: POST /api/v1/search/, final_topk {FINAL_TOPK}, queries cycled from the
sample queries, from {args.concurrency} closed-loop clients on the same machine.

1. Split: treatment weight {SPLIT_WEIGHT:.0%} (PUT /api/v1/admin/rollout/weight), {args.settle:.0f} s
   for the ingress replicas to pick it up, one search from each of {args.users:,} distinct callers
   (`X-User-Id`), each answer's `arm` compared with `serve_app.router.choose_arm`; then {args.repeat_users}
   sampled callers {args.repeats} times more each; then weight {RAISED_WEIGHT:.0%} and every caller again.
2. Propagation: under closed-loop load from mixed callers (the same {args.users:,}, shuffled), at
   treatment {RAISED_WEIGHT:.0%}, `{FLAG}` flipped {args.flips} times on the treatment (PUT
   /api/v1/admin/flags), then {args.rollbacks} times: treatment {RAISED_WEIGHT:.0%}, wait, POST
   /api/v1/admin/rollout/rollback; changes {args.gap:.0f} s apart. A change's window runs from its
   admin call's return to the next change's call. Flip propagation: the latest send time in the
   window, after the PUT returned, of a search answered with a `config_version` older than the
   version the PUT reported (answers from both arms' replicas count). Rollback propagation: the latest
   send time after the POST returned of a search answered by the treatment. 0 when there was none.

{summary_table(run)}

Per flip (s): {flips}. Per rollback (s): {rollbacks}. Searches each replica handled during the
propagation phase (Serve's `{SERVE_REQUESTS}` on Ray's exporter): {replica_counts(run.under_load)}.

{changes_table(run)}

{"Every target met; no search failed." if not found else "Problems: " + "; ".join(found) + "."}
The guard made {len(run.guard)} rollbacks by itself during the run.

Searches around the slowest flip and rollback, and the whole load: `{relative(args.plot)}`.
"""


def print_report(run: Run) -> None:
    print(summary_table(run))
    print()
    print(changes_table(run))
    print()
    print(f"searches per replica under load: {replica_counts(run.under_load)}")
    for error in sorted(set(run.failures))[:5]:
        print(f"failed: {run.failures.count(error)} x {error}", file=sys.stderr)
    for problem in problems(run):
        print(f"problem: {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    settings = bench_settings(args.state_dir)
    assert settings.database.url
    key = asyncio.run(prepare_database(settings, "bench-rollout"))
    try:
        result = run(settings, key, args)
    finally:
        asyncio.run(revoke(settings.database.url, key))

    print_report(result)
    plot(result, args.plot)
    loads = (load_at_start, os.getloadavg()[0])
    replace_section(args.results, SECTION,
                    section_body(result, settings, args, loads, time.perf_counter() - started))
    print(f"wrote {relative(args.plot)} and the section '{SECTION}' of {relative(args.results)}")
    return 1 if problems(result) else 0


if __name__ == "__main__":
    sys.exit(main())
