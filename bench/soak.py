"""Soak: `--minutes` of `--clients` closed-loop clients with learning on; errors, throughput,
latency per minute, and the resident memory of every process of the cluster over time.

The cluster is started the way `dtrag up` starts it (embedded PostgreSQL with the sample corpus,
our own loopback Ray on 127.0.0.1:8700, Serve, the app) with `FEATURE_EXPERIENCE_REPLAY=on
FEATURE_SOFT_Q_BANDIT=on`. Each client searches a judged query of the sample corpus, then sends
its judgements as feedback, so the replay fills and the learners run throughout. After
`--warmup` uncounted seconds, the RSS of every process (this driver with the load generator,
Ray's own processes, the proxy, ingress, arms, embedder, actors, PostgreSQL and its backends) is
read every `--sample-every` seconds. Target: 0 failed requests.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 10] [--state-dir /tmp/soak-state]

It prints a line per minute while it runs, then the per-minute table and RSS per role at start
and end; writes `bench/results/soak.png` (RSS and p95 over time) and the section
"## Soak: 10 clients with learning on" of `bench/RESULTS.md`; exits 1 on any failed request.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    Judged,
    OtherWork,
    Outcome,
    cluster_processes,
    learning_load,
    learning_on_environment,
    percentiles_ms,
    relative,
    replace_section,
    rss_by_role,
    running_cluster,
)

SECTION = "## Soak: 10 clients with learning on"
HTTP_PORT = 8700
METRICS_PORT = 9700
MB = 1024 * 1024

RssSample = tuple[float, dict[str, int]]  # seconds since the measured part began, role -> bytes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="measured duration")
    parser.add_argument("--clients", type=int, default=10, help="closed-loop clients (search, then feedback)")
    parser.add_argument("--warmup", type=float, default=30.0, help="uncounted seconds of load first")
    parser.add_argument("--sample-every", type=float, default=15.0, help="seconds between RSS readings")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/soak-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "soak.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


async def soak(url: str, key: str, args: argparse.Namespace) -> tuple[list[Outcome], list[RssSample], float]:
    """Warm up, then load for `--minutes` while reading RSS; returns the measured requests, the
    readings, and the share of the cores other work used meanwhile."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    began = time.monotonic() + args.warmup  # `sent` < 0: warm-up
    load = asyncio.create_task(learning_load(url, key, args.clients, stop, outcomes, Judged.sample(), began))
    samples: list[RssSample] = []
    try:
        await asyncio.sleep(args.warmup)
        roles = cluster_processes(args.state_dir)
        other_work = OtherWork(roles)
        end, next_minute = began + 60 * args.minutes, 60.0
        while (now := time.monotonic()) < end:
            roles |= cluster_processes(args.state_dir)  # a restarted worker comes under its role
            samples.append((now - began, rss_by_role(roles)))
            if now - began >= next_minute:
                print(minute_line(int(next_minute // 60), outcomes, samples[-1][1]), flush=True)
                next_minute += 60.0
            await asyncio.sleep(min(args.sample_every, max(end - time.monotonic(), 0)))
        samples.append((time.monotonic() - began, rss_by_role(roles)))
        other = other_work.share()
    finally:
        stop.set()
        await load
    return [o for o in outcomes if 0 <= o.sent < 60 * args.minutes], samples, other


def by_minute(outcomes: Sequence[Outcome]) -> dict[int, list[Outcome]]:
    minutes: dict[int, list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        minutes[int(o.sent // 60)].append(o)
    return dict(sorted(minutes.items()))


def minute_line(minute: int, outcomes: Sequence[Outcome], rss: dict[str, int]) -> str:
    last = [o for o in outcomes if minute - 1 <= o.sent / 60 < minute]
    searches = [o for o in last if o.kind == "search"]
    p50, p95, _ = percentiles_ms([o.seconds for o in searches])
    return (f"minute {minute}: {len(searches)} searches ({len(searches) / 60:.1f}/s), "
            f"{sum(not o.ok for o in last)} failed, search p50 {p50:.0f} ms p95 {p95:.0f} ms, "
            f"cluster RSS {sum(rss.values()) / MB:.0f} MB")


def minutes_table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| minute | searches/s | feedback/s | failed | search p50 ms | p95 ms | p99 ms | max ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for minute, rows in by_minute(outcomes).items():
        searches = [o.seconds for o in rows if o.kind == "search"]
        p50, p95, top = percentiles_ms(searches)
        p99 = float(np.percentile(searches, 99)) * 1000 if searches else float("nan")
        lines.append(f"| {minute + 1} | {len(searches) / 60:.2f} | "
                     f"{sum(o.kind == 'feedback' for o in rows) / 60:.2f} | {sum(not o.ok for o in rows)} | "
                     f"{p50:.0f} | {p95:.0f} | {p99:.0f} | {top:.0f} |")
    return "\n".join(lines)


def rss_table(samples: Sequence[RssSample]) -> str:
    (t0, start), (t1, end) = samples[0], samples[-1]
    lines = [f"| process (role) | RSS at {t0:.0f} s, MB | at {t1:.0f} s, MB | growth MB | growth % |",
             "|---|---:|---:|---:|---:|"]
    for role in sorted(start.keys() | end.keys(), key=lambda r: -end.get(r, 0)):
        a, b = start.get(role, 0) / MB, end.get(role, 0) / MB
        lines.append(f"| {role} | {a:.0f} | {b:.0f} | {b - a:+.1f} | {100 * (b - a) / a if a else float('nan'):+.1f} |")
    a, b = sum(start.values()) / MB, sum(end.values()) / MB
    lines.append(f"| **all** | {a:.0f} | {b:.0f} | {b - a:+.1f} | {100 * (b - a) / a:+.1f} |")
    return "\n".join(lines)


def plot(outcomes: Sequence[Outcome], samples: Sequence[RssSample], path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    times = [t / 60 for t, _ in samples]
    biggest = sorted(samples[-1][1], key=lambda r: -samples[-1][1][r])
    for role in biggest[:8]:
        memory.plot(times, [rss.get(role, 0) / MB for _, rss in samples], label=role)
    others = biggest[8:]
    memory.plot(times, [sum(rss.get(r, 0) for r in others) / MB for _, rss in samples], label="all others",
                color="gray")
    memory.set(ylabel="RSS (MB)", title="Resident memory per process role")
    memory.legend(fontsize=7, ncol=3)
    memory.grid(alpha=0.3)
    window = 15.0  # seconds per latency point
    searches = [o for o in outcomes if o.kind == "search"]
    buckets: dict[int, list[float]] = collections.defaultdict(list)
    for o in searches:
        buckets[int(o.sent // window)].append(o.seconds)
    keys = sorted(buckets)
    centres = [(k + 0.5) * window / 60 for k in keys]
    for position, name in ((0, "p50"), (1, "p95")):
        latency.plot(centres, [percentiles_ms(buckets[k])[position] for k in keys],
                     label=f"search {name} per {window:.0f} s")
    latency.set(xlabel="minutes", ylabel="latency (ms)", xlim=(0, minutes),
                title=f"{len(searches)} searches, {sum(not o.ok for o in outcomes)} failed requests")
    latency.legend()
    latency.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def section_body(outcomes: Sequence[Outcome], samples: Sequence[RssSample], other: float,
                 args: argparse.Namespace) -> str:
    command = shlex.join([".venv/bin/python", "bench/soak.py", *sys.argv[1:]])
    failed = [o for o in outcomes if not o.ok]
    searches = [o for o in outcomes if o.kind == "search"]
    p50, p95, top = percentiles_ms([o.seconds for o in searches])
    kinds = collections.Counter(f"{o.kind} {o.status}: {o.body[:120]}" for o in failed)
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Result: **{'pass' if not failed else 'FAIL'}**
({len(failed)} failed of {len(outcomes)} requests; target 0).

```
{command}
```

{args.clients} closed-loop clients for {args.minutes:g} min after {args.warmup:.0f} s of uncounted warm-up, each
searching a judged query of the sample corpus and then sending its judgements as feedback, learning
on (`FEATURE_EXPERIENCE_REPLAY=on FEATURE_SOFT_Q_BANDIT=on`); the cluster as `dtrag up` starts it (one
replica per deployment). {len(searches)} searches ({len(searches) / (60 * args.minutes):.2f}/s), p50
{p50:.0f} ms, p95 {p95:.0f} ms, max {top:.0f} ms over the whole run. Processes outside the cluster
used {100 * other:.0f}% of the machine's {os.cpu_count()} cores meanwhile (well above 0: the cores were
shared, and the latencies are pessimistic).

{minutes_table(outcomes)}

Resident memory (RSS) per process role, summed over its processes, at the first and last reading
(every {args.sample_every:.0f} s). `postgres` sums the server and its backends, so shared buffers count
once per backend that touched them; `IDLE` are Ray's pooled idle workers.

{rss_table(samples)}

{chr(10).join(f'- {n} x `{text}`' for text, n in kinds.most_common(5)) or 'No failed requests.'}

RSS and p95 over time: `{relative(args.plot)}`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    learning_on_environment()
    with running_cluster(args.state_dir, HTTP_PORT, METRICS_PORT, "bench-soak") as (_, url, key):
        print(f"soak: {args.warmup:.0f} s warm-up, then {args.minutes:g} min at {args.clients} clients", flush=True)
        outcomes, samples, other = asyncio.run(soak(url, key, args))
    print(minutes_table(outcomes), rss_table(samples), sep="\n\n")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(outcomes, samples, args.plot, args.minutes)
    replace_section(args.results, SECTION, section_body(outcomes, samples, other, args))
    failed = sum(not o.ok for o in outcomes)
    print(f"{len(outcomes)} requests, {failed} failed; wrote {args.plot} and the soak section of {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
