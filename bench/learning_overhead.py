"""What learning costs while serving: request latency with `experience_replay` + `soft_q_bandit`
on versus off, and the memory of 10,000 experiences in the `LearningState` actor.

Latency. Both configurations run side by side in one Serve app through the product's own A/B
split: the control arm with the flags off, the treatment arm with them on (set over the admin
API), the treatment at 50%, and one caller id pinned to each arm by the sticky router. Both
share the proxy, ingress and embedder; only the arm differs. One sequential client sends the
same queries as both callers, alternating which goes first in each pair (the first request
warms PostgreSQL's cache for the second), so machine noise lands on both sides alike.
It reports HTTP latency (client-timed) and the pipeline's own `latency_ms` (no HTTP or proxy),
p50/p95/p99/mean per side, on - off, on / off, and a bootstrap 95% interval of the p50
difference. Target: p50 increase under 2 ms.

Memory. Before the app is deployed, a `LearningState` actor is created against a scratch
database (so no earlier checkpoint is restored into it), 10,000 synthetic experiences are added
in batches, and the actor process's RSS is read before and after, next to the buffer's own
`replay_bytes`. Target: at most 5 MB for 10,000 experiences. The scratch database is dropped.

The state folder's embedded database is used; if it holds no documents, the sample corpus
(`cluster/data/sample_corpus`) is ingested first. The script starts and stops its own loopback
Ray, with Serve on 127.0.0.1:8300 and Ray's metrics exporter on 127.0.0.1:9300:

    .venv/bin/python bench/learning_overhead.py [--state-dir /tmp/overhead-state] [--requests 1000]

It prints the tables, writes `bench/results/learning_overhead.png` and the section
"## Learning on the request path" of `bench/RESULTS.md`, and exits 1 if any request failed or
the comparison did not hold (flags not in effect, a request on the wrong arm, a rollback).
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
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    admin,
    local_settings,
    prepare_database,
    relative,
    scratch_database,
    replace_section,
    revoke,
    wait_healthy,
)
from cluster.actors import NAMESPACE  # noqa: E402
from cluster.actors.learning_state import ACTOR_NAME, LearningState  # noqa: E402
from cluster.actors.start import learning_heads, learning_state  # noqa: E402
from cluster.core.vocabulary import Arm, Flag  # noqa: E402
from cluster.data.beir import load_queries  # noqa: E402
from cluster.data.corpus import sample_corpus_dir  # noqa: E402
from cluster.platform.database import resolve_database_url  # noqa: E402
from cluster.platform.runtime import deploy, start_ray, start_serve  # noqa: E402
from cluster.platform.settings import Settings, load_settings  # noqa: E402
from learners.context import FEATURES  # noqa: E402
from learners.learning_core import RewardedSearch  # noqa: E402
from serve_app.app import APP_NAME, build_app  # noqa: E402
from serve_app.router import choose_arm  # noqa: E402

SECTION = "## Learning on the request path"
DEFAULT_ACTION = "hybrid@0.5"  # complete-score fusion at the default weight
FLAGS = (Flag.EXPERIENCE_REPLAY, Flag.SOFT_Q_BANDIT)
ARMS = {"off": Arm.CONTROL, "on": Arm.TREATMENT}  # side (the flags) -> the arm that serves it
SIDES = tuple(ARMS)
TREATMENT_WEIGHT = 0.5
FINAL_TOPK = 10
HTTP_PORT = 8300
METRICS_PORT = 9300  # not the default 9095: another Ray on this machine may hold it
REQUEST_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 300.0
P50_TARGET_MS = 2.0
MEMORY_EXPERIENCES = 10_000
MEMORY_TARGET_BYTES = 5 * 1024 * 1024
ADD_BATCH = 250
BOOTSTRAP_RESAMPLES = 2_000


@dataclasses.dataclass
class Side:
    """What one configuration answered: client and pipeline latencies (ms), strategies, failures."""

    name: str
    http_ms: list[float] = dataclasses.field(default_factory=list)
    pipeline_ms: list[float] = dataclasses.field(default_factory=list)
    strategies: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    short_lists: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by query
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    experiences: int
    capacity: int
    replay_size: int
    replay_bytes: int
    rss_before: int
    rss_after: int

    @property
    def rss_delta(self) -> int:
        return self.rss_after - self.rss_before


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/overhead-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per side")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests per side first")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="requests not sent by then count as failed")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "learning_overhead.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


# --- memory of the learning actor -------------------------------------------------------------


def synthetic_experiences(count: int, actions: int, seed: int = 0) -> list[RewardedSearch]:
    """Rewarded searches with random contexts, each rewarding only its action (as clicks would)."""
    rng = np.random.default_rng(seed)
    contexts = rng.random((count, len(FEATURES)))
    chosen = rng.integers(actions, size=count)
    rewards = rng.random(count)
    return [
        RewardedSearch(x.tolist(), int(a), quality=float(r), cost=0.0, propensity=1.0 / actions, policy_version=0)
        for x, a, r in zip(contexts, chosen, rewards, strict=True)
    ]


def learning_state_pid() -> int:
    """PID of the live `LearningState` actor, from the GCS actor table.

    `ray.util.state.list_actors` needs the dashboard, which benchmarks leave off (`local_settings`).
    """
    for actor in ray._private.state.actors().values():
        if actor["Name"] == ACTOR_NAME and actor["State"] == "ALIVE":
            return int(actor["Pid"])
    raise RuntimeError(f"no live actor named {ACTOR_NAME!r}")


def create_learning_state(database_url: str, settings: Settings) -> ray.actor.ActorHandle:
    """A `LearningState` alone (no rollout control, no learners pulling batches from it).

    Named and detached as `cluster.actors.start.start_actors` creates it, so `learning_state_pid`
    finds it; it is killed before the app is deployed, and `build_app` then starts a fresh one.
    """
    return LearningState.options(
        name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote(database_url, settings.learning, learning_heads(settings))


def kill_learning_state() -> None:
    """Kill the named actor for good and wait until its name is free again."""
    ray.kill(learning_state(), no_restart=True)
    while True:
        try:
            learning_state()
        except ValueError:
            return
        time.sleep(0.1)


def measure_memory(settings: Settings) -> MemoryResult:
    """RSS of a fresh `LearningState` before and after `MEMORY_EXPERIENCES` experiences."""
    assert settings.database.url
    experiences = synthetic_experiences(MEMORY_EXPERIENCES, len(settings.retrieval.actions))
    with scratch_database(settings.database.url, "overhead") as url:
        actor = create_learning_state(url, settings)
        ray.get(actor.stats.remote())  # constructed and restored (from nothing)
        process = psutil.Process(learning_state_pid())
        rss_before = process.memory_info().rss
        for start in tqdm(range(0, len(experiences), ADD_BATCH), desc="add experiences", unit="batch"):
            ray.get(actor.add.remote("retrieval", experiences[start : start + ADD_BATCH]))
        stats = ray.get(actor.stats.remote())
        rss_after = process.memory_info().rss
        kill_learning_state()
    return MemoryResult(len(experiences), settings.learning.core.capacity, stats["replay_size"],
                        stats["replay_bytes"], rss_before, rss_after)


# --- latency: control (flags off) and treatment (flags on) side by side -----------------------


def configure_arms(client: httpx.Client) -> None:
    """Control with the flags off, treatment with them on, each for half the callers."""
    for side, arm in ARMS.items():
        admin(client, "PUT", "/api/v1/admin/flags", {"arm": arm, "flags": dict.fromkeys(FLAGS, side == "on")})
    admin(client, "PUT", "/api/v1/admin/rollout/weight", {"treatment_weight": TREATMENT_WEIGHT})


def caller_ids() -> dict[str, str]:
    """For each side, a user id that the sticky router sends to that side's arm."""
    side_of = {arm: side for side, arm in ARMS.items()}
    users = (f"bench-user-{i}" for i in itertools.count())
    found: dict[str, str] = {}
    while len(found) < len(ARMS):
        user = next(users)
        found.setdefault(side_of[choose_arm(user, {Arm.TREATMENT: TREATMENT_WEIGHT})], user)
    return found


def wait_routed(client: httpx.Client, users: dict[str, str], refresh_s: float) -> None:
    """Until each caller reaches its arm, then a few refreshes more so the arms hold their flags."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        arms = {side: client.post("/api/v1/search/", json={"q": "routing check"},
                                  headers={"X-User-Id": users[side]}).json().get("arm") for side in ARMS}
        if arms == ARMS:
            time.sleep(4 * refresh_s)
            return
        time.sleep(refresh_s)
    raise TimeoutError(f"callers did not reach their arms within {HEALTH_TIMEOUT_S:.0f} s")


def search(client: httpx.Client, side: Side, user: str, query: str, measured: bool) -> None:
    """One search as `user`; its latencies are kept when `measured`, failures always."""
    started = time.perf_counter()
    try:
        response = client.post("/api/v1/search/", json={"q": query, "final_topk": FINAL_TOPK},
                               headers={"X-User-Id": user})
    except httpx.HTTPError as error:
        side.errors.append(f"{type(error).__name__}: {error}")
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        side.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    body = response.json()
    if body["arm"] != ARMS[side.name]:
        side.errors.append(f"served by arm '{body['arm']}' instead of '{ARMS[side.name]}'")
        return
    if len(body["hits"]) != FINAL_TOPK:
        # BM25 leaves out documents sharing no term with the query, so `lexical` may fall short.
        if body["strategy"] != "lexical":
            side.errors.append(f"{body['strategy']}: {len(body['hits'])} hits instead of {FINAL_TOPK}")
            return
        side.short_lists[query] += measured
    if measured:
        side.http_ms.append(elapsed_ms)
        side.pipeline_ms.append(body["latency_ms"])
        side.strategies[body["strategy"]] += 1


def run_pairs(client: httpx.Client, users: dict[str, str], queries: Sequence[str], sides: dict[str, Side],
              measured: bool, deadline: float) -> None:
    """The same query to both sides in turn, alternating which goes first (the first warms the cache)."""
    label = "measured pairs" if measured else "warm-up pairs"
    for i, query in enumerate(tqdm(queries, desc=label, unit="pair")):
        for name in SIDES if i % 2 == 0 else SIDES[::-1]:
            if time.monotonic() > deadline:
                sides[name].errors.append("not sent: time limit reached")
            else:
                search(client, sides[name], users[name], query, measured)


async def experiences_by_arm(url: str) -> collections.Counter[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT arm, count(*) FROM experiences GROUP BY arm")
        return collections.Counter({row["arm"]: row["count"] for row in rows})
    finally:
        await connection.close()


@dataclasses.dataclass(frozen=True)
class LatencyRun:
    sides: dict[str, Side]
    logged: dict[str, int]  # experiences each side's arm wrote during the measured pairs
    rollout: dict[str, Any]  # the control plane's status afterwards
    policy_version: int


def measure_latency(settings: Settings, key: str, args: argparse.Namespace) -> LatencyRun:
    """Deploy the app, split callers 50/50 between the arms, and send interleaved searches."""
    assert settings.database.url
    deploy(build_app(settings), APP_NAME)
    url = f"http://{settings.http.host}:{settings.http.port}"
    wait_healthy(url, HEALTH_TIMEOUT_S)
    users = caller_ids()
    queries = list(load_queries(sample_corpus_dir()).values())
    cycled = list(itertools.islice(itertools.cycle(queries), args.warmup + args.requests))
    sides = {name: Side(name) for name in SIDES}
    deadline = time.monotonic() + args.max_seconds
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=REQUEST_TIMEOUT_S) as client:
        configure_arms(client)
        wait_routed(client, users, settings.rollout.live_refresh_s)
        run_pairs(client, users, cycled[: args.warmup], sides, False, deadline)
        before = asyncio.run(experiences_by_arm(settings.database.url))
        run_pairs(client, users, cycled[args.warmup :], sides, True, deadline)
        time.sleep(1.0)  # let the last experiences flush
        after = asyncio.run(experiences_by_arm(settings.database.url))
        rollout = admin(client, "GET", "/api/v1/admin/rollout")
        learning = admin(client, "GET", "/api/v1/admin/learning")
    logged = {side: after[arm] - before[arm] for side, arm in ARMS.items()}
    return LatencyRun(sides, logged, rollout, learning["state"]["policy_version"])


def flag_problems(run: LatencyRun, requests: int) -> list[str]:
    """Evidence that the comparison held: flags took effect on the right arm, no rollback."""
    problems = []
    if run.logged["on"] < requests:
        problems.append(f"flags on: only {run.logged['on']} experiences logged for {requests} searches")
    if run.logged["off"]:
        problems.append(f"flags off: {run.logged['off']} experiences logged")
    if len(run.sides["on"].strategies) < 2:
        problems.append(f"flags on: the policy never explored ({dict(run.sides['on'].strategies)})")
    if set(run.sides["off"].strategies) - {DEFAULT_ACTION}:
        problems.append(f"flags off: strategies other than the default ({dict(run.sides['off'].strategies)})")
    if run.rollout["treatment_weight"] != TREATMENT_WEIGHT:
        problems.append(f"treatment weight is {run.rollout['treatment_weight']} "
                        f"(rolled back: {run.rollout.get('rolled_back')})")
    return problems


# --- statistics and reporting ------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    data = np.asarray(values)
    if not len(data):
        return dict.fromkeys(("p50", "p95", "p99", "mean"), float("nan"))
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(data.mean())}


def p50_difference_interval(on: Sequence[float], off: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of p50(on) - p50(off), resampling the request pairs together."""
    pairs = min(len(on), len(off))
    if pairs == 0:
        return float("nan"), float("nan")
    on_array, off_array = np.asarray(on[:pairs]), np.asarray(off[:pairs])
    picks = np.random.default_rng(seed).integers(pairs, size=(BOOTSTRAP_RESAMPLES, pairs))
    differences = np.median(on_array[picks], axis=1) - np.median(off_array[picks], axis=1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def latency_table(sides: dict[str, Side]) -> str:
    lines = ["| latency | stat | flags off (ms) | flags on (ms) | on - off (ms) | on / off |",
             "|---|---|---:|---:|---:|---:|"]
    for label, attribute in (("HTTP (client)", "http_ms"), ("pipeline `latency_ms`", "pipeline_ms")):
        off, on = (summary(getattr(sides[s], attribute)) for s in SIDES)
        for stat in ("p50", "p95", "p99", "mean"):
            lines.append(f"| {label} | {stat} | {off[stat]:.2f} | {on[stat]:.2f} | "
                         f"{on[stat] - off[stat]:+.2f} | {on[stat] / off[stat]:.3f} |")
    return "\n".join(lines)


def target_verdict(low: float, high: float) -> str:
    """Whether the whole interval of the p50 increase is under, over, or across the target."""
    if high < P50_TARGET_MS:
        return "met"
    if low >= P50_TARGET_MS:
        return "NOT met"
    return f"not resolved (the interval spans {P50_TARGET_MS:.0f} ms)"


def verdicts(sides: dict[str, Side], memory: MemoryResult) -> str:
    lines = []
    for label, attribute in (("HTTP", "http_ms"), ("pipeline", "pipeline_ms")):
        on, off = getattr(sides["on"], attribute), getattr(sides["off"], attribute)
        difference = summary(on)["p50"] - summary(off)["p50"]
        low, high = p50_difference_interval(on, off)
        lines.append(f"- {label} p50 increase: {difference:+.2f} ms (95% bootstrap interval "
                     f"{low:+.2f} to {high:+.2f} ms); target < {P50_TARGET_MS:.0f} ms: "
                     f"{target_verdict(low, high)}.")
    fits = max(memory.replay_bytes, memory.rss_delta) <= MEMORY_TARGET_BYTES
    lines.append(f"- Memory of {memory.experiences:,} experiences: buffer {memory.replay_bytes / 1e6:.2f} MB, "
                 f"actor RSS {memory.rss_delta / 1e6:+.2f} MB; target <= 5 MB: {'met' if fits else 'NOT met'}.")
    return "\n".join(lines)


def memory_table(memory: MemoryResult) -> str:
    rows = [
        (f"replay buffer `replay_bytes` (capacity {memory.capacity:,}, holding {memory.replay_size:,})",
         memory.replay_bytes, True),
        ("actor RSS before", memory.rss_before, False),
        (f"actor RSS after {memory.experiences:,} adds", memory.rss_after, False),
        ("actor RSS delta", memory.rss_delta, True),
    ]
    lines = ["| measure | bytes | MB | bytes / experience |", "|---|---:|---:|---:|"]
    for label, size, per_experience in rows:
        per = f"{size / memory.experiences:.1f}" if per_experience else ""
        lines.append(f"| {label} | {size:,} | {size / 1e6:.2f} | {per} |")
    return "\n".join(lines)


def plot_latencies(sides: dict[str, Side], path: Path) -> None:
    """Histograms of HTTP and pipeline latency, flags off against on, with their p50s marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, (title, attribute) in zip(axes, (("HTTP latency (client)", "http_ms"),
                                               ("pipeline latency_ms (no HTTP/proxy)", "pipeline_ms"))):
        everything = np.concatenate([getattr(sides[s], attribute) for s in SIDES])
        if not len(everything):
            continue
        bins = np.linspace(everything.min(), np.percentile(everything, 99.5), 80)
        for name, color in zip(SIDES, ("tab:blue", "tab:orange")):
            values = getattr(sides[name], attribute)
            p50 = summary(values)["p50"]
            axis.hist(values, bins=bins, histtype="step", linewidth=1.5, color=color,
                      label=f"flags {name} (p50 {p50:.1f} ms)")
            axis.axvline(p50, color=color, linestyle="--", linewidth=1)
        axis.set(xlabel="ms", ylabel="requests", title=f"{title}, to p99.5")
        axis.legend()
    figure.suptitle(f"POST /api/v1/search/ with {' + '.join(FLAGS)} off vs on "
                    f"({len(sides['on'].http_ms)} interleaved requests each)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def section_body(run: LatencyRun, memory: MemoryResult, loads: tuple[float, float],
                 args: argparse.Namespace, seconds: float) -> str:
    command = shlex.join([".venv/bin/python", "bench/learning_overhead.py", *sys.argv[1:]])
    sides = run.sides
    mix = ", ".join(f"{s} {n}" for s, n in sides["on"].strategies.most_common())
    short = +sides["on"].short_lists
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores, Python
{sys.version.split()[0]}, Ray {ray.__version__}; the run took {seconds:.0f} s. 1-minute load average
{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (other jobs shared the machine).

```
{command}
```

One Serve app on a local Ray, on the sample corpus, split by the product's own A/B routing:
the control arm with `{' + '.join(FLAGS)}` off, the treatment arm with them on (admin API),
treatment weight {TREATMENT_WEIGHT:.0%}, one caller id (`X-User-Id`) pinned to each arm. Both arms
share the proxy, ingress and embedder (one replica each). One sequential client sent
{args.requests} measured searches as each caller (POST /api/v1/search/, final_topk {FINAL_TOPK},
no strategy named, queries cycled from the sample queries) after {args.warmup} warm-up searches
each: the same query to both arms in turn, alternating which went first; every response was
checked to come from the intended arm. HTTP latency is timed by the client; pipeline latency is
the response's `latency_ms` (embedding, retrieval, fusion, answer; no HTTP, proxy or handle
hops). The interval is a bootstrap over request pairs.

{latency_table(sides)}

{verdicts(sides, memory)}

With the flags on, the policy picked: {mix} (no feedback was sent, so it acted on a fresh model,
version {run.policy_version}: the default action, and the exploration share of a policy that has
seen no graded feedback); the treatment arm logged {run.logged['on']} experiences for the measured
searches. {short.total()} searches ({len(short)} distinct queries) returned fewer than
{FINAL_TOPK} hits: counted, not failed. With the flags off, every search used {DEFAULT_ACTION}
and returned {FINAL_TOPK} hits, and the control arm logged {run.logged['off']} experiences. The treatment weight was still
{run.rollout['treatment_weight']:.0%} at the end (no rollback by the guard).

Memory: a fresh `LearningState` actor (against a scratch database, so nothing was restored),
{memory.experiences:,} synthetic rewarded experiences added in batches of {ADD_BATCH}; RSS of
the actor process (psutil) before and after. The buffer is allocated at its capacity when the
actor starts, so the RSS delta is what filling it costs on top (plus one-off costs of the first
`add` calls).

{memory_table(memory)}

Latency distributions: `{relative(args.plot)}`.
"""


def print_report(sides: dict[str, Side], memory: MemoryResult, problems: list[str]) -> None:
    print(latency_table(sides))
    print()
    print(memory_table(memory))
    print()
    print(verdicts(sides, memory))
    for side in sides.values():
        for error in sorted(set(side.errors))[:5]:
            print(f"flags {side.name}: {side.errors.count(error)} x {error}", file=sys.stderr)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)


def run(settings: Settings, key: str, args: argparse.Namespace) -> tuple[MemoryResult, LatencyRun]:
    """Memory first (a quieter machine, no app yet), then the interleaved latency run."""
    start_ray(settings.ray)
    try:
        memory = measure_memory(settings)
        start_serve(settings.http)
        return memory, measure_latency(settings, key, args)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    base = local_settings(load_settings(), HTTP_PORT, METRICS_PORT)  # our own local Ray
    settings = base.with_database_url(resolve_database_url(None, args.state_dir))
    assert settings.database.url
    key = asyncio.run(prepare_database(settings, "bench-learning-overhead"))
    try:
        memory, latency = run(settings, key, args)
    finally:
        asyncio.run(revoke(settings.database.url, key))

    problems = flag_problems(latency, args.requests)
    print_report(latency.sides, memory, problems)
    plot_latencies(latency.sides, args.plot)
    loads = (load_at_start, os.getloadavg()[0])
    replace_section(args.results, SECTION,
                    section_body(latency, memory, loads, args, time.perf_counter() - started))
    print(f"wrote {relative(args.plot)} and the section '{SECTION}' of {relative(args.results)}")
    return 1 if problems or any(side.errors for side in latency.sides.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
