"""Serve autoscaling under a load ramp: the arms and the embedder grow from one replica under
load and shrink back after it.

A cluster is started the way `dtrag up` starts it (embedded PostgreSQL with the sample corpus,
our own loopback Ray, Serve, the app with the deployment options of `configs/serve.yaml`), then
closed-loop clients send searches (no feedback: the search path is what scales), in phases of a ramp
(`--phases`, clients:seconds, default 1 -> 16 -> 1). Every second the driver asks Serve how many
replicas of `arm_control`, `arm_treatment` and `Embedder` run. The shipped delays (up 15 s,
down 300 s) would need a much longer run to show the way down, so the benchmark runs a copy of
`configs/serve.yaml` with shorter ones (`--upscale-delay`, `--downscale-delay`) through
`DTRAG_SERVE_CONFIG`, the same way an operator would; every other value is the shipped one.
Ray gets `--ray-cpus` logical CPUs (`DTRAG_RAY_NUM_CPUS`) so every replica up to its maximum can
be placed on this machine's cores.

After the ramp, unless `--fixed-seconds 0`, the same load of the busiest phase runs against a
fixed 1 and then 2 control replicas (embedder and treatment pinned at 1), for the scaling table.

    .venv/bin/python bench/autoscale.py [--dataset BEIR_FOLDER] [--state-dir /tmp/autoscale-state]

`--dataset` takes the queries and judgements from a BEIR folder; its documents are searched only
if that state folder's database holds them (`DTRAG_STATE_DIR=... dtrag db ingest FOLDER` first).
Prints a progress line every `--report-every` seconds, writes `bench/results/autoscale.png`
(replicas, searches/s and p95 over time) and the section of `bench/RESULTS.md`, and exits 1 if
the ramp did not show a scale-up of the control arm and the embedder and their way back to one.
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
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    REPO,
    Judged,
    OtherWork,
    Outcome,
    cluster_processes,
    deploy_app,
    learning_load,
    percentiles_ms,
    relative,
    replace_section,
    running_cluster,
)
from cluster.core.deployments import ARM_CONTROL, ARM_TREATMENT, EMBEDDER  # noqa: E402
from cluster.data.beir import load_qrels, load_queries  # noqa: E402
from cluster.platform.runtime import running_replicas  # noqa: E402
from cluster.platform.settings import Settings  # noqa: E402
from serve_app.app import APP_NAME  # noqa: E402

SECTION = "## Autoscaling: replicas under a load ramp"
HTTP_PORT = 8750
METRICS_PORT = 9750
WATCHED = (ARM_CONTROL, ARM_TREATMENT, EMBEDDER)
GROWING = (ARM_CONTROL, EMBEDDER)  # the deployments the ramp's traffic reaches (treatment gets 0%)
Sample = tuple[float, dict[str, int]]  # seconds since the ramp began, deployment -> running replicas


@dataclasses.dataclass(frozen=True)
class Phase:
    clients: int
    seconds: float
    start: float = 0.0  # seconds since the ramp began

    @property
    def end(self) -> float:
        return self.start + self.seconds


def parse_phases(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        clients, _, seconds = part.partition(":")
        phases.append(Phase(int(clients), float(seconds)))
    if len(phases) < 3 or any(p.clients < 1 or p.seconds <= 0 for p in phases):
        raise argparse.ArgumentTypeError("expected at least three clients:seconds phases, e.g. 1:45,16:150,1:120")
    return phases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", type=parse_phases, default=parse_phases("1:45,16:150,1:120"),
                        help="the ramp: clients:seconds, comma-separated")
    parser.add_argument("--upscale-delay", type=float, default=5.0, help="upscale_delay_s for this run")
    parser.add_argument("--downscale-delay", type=float, default=30.0, help="downscale_delay_s for this run")
    parser.add_argument("--ray-cpus", type=int, default=6, help="Ray's logical CPUs (DTRAG_RAY_NUM_CPUS)")
    parser.add_argument("--fixed-seconds", type=float, default=30.0,
                        help="measured seconds per fixed control count (after 10 s warm-up); 0 skips them")
    parser.add_argument("--report-every", type=float, default=15.0, help="seconds between progress lines")
    parser.add_argument("--dataset", type=Path, help="a BEIR folder to take queries and judgements from")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/autoscale-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--plot", type=Path, default=BENCH / "results" / "autoscale.png")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def with_delays(state_dir: Path, upscale_s: float, downscale_s: float) -> Path:
    """A copy of configs/serve.yaml in `state_dir` whose autoscaled deployments have these delays."""
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    for deployment in config["applications"][0]["deployments"]:
        if "autoscaling_config" in deployment:
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"],
                                                "upscale_delay_s": upscale_s, "downscale_delay_s": downscale_s}
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "serve-short-delays.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def judged_queries(dataset: Path | None) -> Judged:
    if dataset is None:
        return Judged.sample()
    queries, qrels = load_queries(dataset), load_qrels(dataset / "qrels" / "test.tsv")
    ids = sorted(set(queries) & set(qrels))
    return Judged([queries[i] for i in ids], [{d: int(g) for d, g in qrels[i].items()} for i in ids])


def searches(outcomes: Sequence[Outcome], start: float, end: float) -> list[Outcome]:
    return [o for o in outcomes if o.kind == "search" and start <= o.done < end]


async def watch(samples: list[Sample], began: float, stop: asyncio.Event) -> None:
    """Ask Serve for the running replicas every second until `stop`."""
    while not stop.is_set():
        counts = await asyncio.to_thread(running_replicas, APP_NAME, WATCHED)
        samples.append((time.monotonic() - began, counts))
        await asyncio.sleep(1.0)


async def ramp(url: str, key: str, judged: Judged, phases: list[Phase], report_every: float,
               ) -> tuple[list[Outcome], list[Sample], list[Phase]]:
    """Run each phase's clients in turn while watching the replicas; the phases with their start times."""
    outcomes: list[Outcome] = []
    samples: list[Sample] = []
    began = time.monotonic()
    done_watching = asyncio.Event()
    watcher = asyncio.create_task(watch(samples, began, done_watching))
    ran = []
    for number, phase in enumerate(phases, start=1):
        phase = dataclasses.replace(phase, start=time.monotonic() - began)
        ran.append(phase)
        stop = asyncio.Event()
        load = asyncio.create_task(
            learning_load(url, key, phase.clients, stop, outcomes, judged, began, feedback=False))
        while (now := time.monotonic() - began) < phase.end:
            await asyncio.sleep(min(report_every, phase.end - now))
            now = time.monotonic() - began
            recent = searches(outcomes, now - report_every, now)
            replicas = samples[-1][1] if samples else {}
            print(f"[{now:5.0f} s] phase {number}/{len(phases)} ({phase.clients} clients): "
                  f"{len(recent) / report_every:5.1f} searches/s, p95 {percentiles_ms([o.seconds for o in recent])[1]:5.0f} ms, "
                  f"replicas {replicas}", flush=True)
        stop.set()
        await load
    done_watching.set()
    await watcher
    return outcomes, samples, ran


async def fixed_load(url: str, key: str, judged: Judged, clients: int, seconds: float) -> list[Outcome]:
    """`clients` for 10 s of warm-up and `seconds` measured; the measured searches."""
    outcomes: list[Outcome] = []
    began, stop = time.monotonic(), asyncio.Event()
    load = asyncio.create_task(learning_load(url, key, clients, stop, outcomes, judged, began, feedback=False))
    await asyncio.sleep(10.0 + seconds)
    stop.set()
    await load
    return searches(outcomes, 10.0, 10.0 + seconds)


def pinned(settings: Settings, control: int) -> Settings:
    return dataclasses.replace(
        settings, serve=dataclasses.replace(settings.serve, pipeline_replicas=control, embedder_replicas=1),
        rollout=dataclasses.replace(settings.rollout, treatment_replicas=1))


# --- the figures ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhaseRow:
    clients: int
    start: float
    end: float
    searches: int
    failed: int
    per_s: float
    p50_ms: float
    p95_ms: float
    most: dict[str, int]  # the most replicas seen running during the phase
    last: dict[str, int]  # at its end


def phase_rows(outcomes: Sequence[Outcome], samples: Sequence[Sample], phases: Sequence[Phase]) -> list[PhaseRow]:
    rows = []
    for phase in phases:
        done = searches(outcomes, phase.start, phase.end)
        ok = [o for o in done if o.ok]
        seen = [counts for t, counts in samples if phase.start <= t < phase.end] or [{}]
        p50, p95, _ = percentiles_ms([o.seconds for o in ok])
        rows.append(PhaseRow(phase.clients, phase.start, phase.end, len(done), len(done) - len(ok),
                             len(ok) / phase.seconds, p50, p95,
                             {n: max(c.get(n, 0) for c in seen) for n in WATCHED}, seen[-1]))
    return rows


def checks(rows: Sequence[PhaseRow]) -> list[tuple[str, bool]]:
    busiest = max(rows, key=lambda r: r.clients)
    after = rows[rows.index(busiest) + 1:]
    found = []
    for name in GROWING:
        found.append((f"{name} grew from 1 under load (most {busiest.most[name]})",
                      rows[0].last.get(name) == 1 and busiest.most[name] > 1))
        found.append((f"{name} back to 1 after it (at the end {after[-1].last.get(name)})",
                      bool(after) and after[-1].last.get(name) == 1))
    return found


def plot(outcomes: Sequence[Outcome], samples: Sequence[Sample], phases: Sequence[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (replicas, rate, latency) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    times = [t for t, _ in samples]
    for name, style in zip(WATCHED, ("-", ":", "--")):  # distinct styles: equal counts overlap
        replicas.step(times, [counts.get(name, 0) for _, counts in samples], where="post", label=name,
                      linestyle=style, linewidth=2)
    replicas.set(ylabel="running replicas", title="Serve autoscaling under a closed-loop load ramp")
    window = 5.0
    ends = [k * window for k in range(1, int(phases[-1].end // window) + 1)]
    buckets = [[o for o in searches(outcomes, end - window, end) if o.ok] for end in ends]
    rate.plot(ends, [len(b) / window for b in buckets], label=f"searches/s per {window:.0f} s")
    rate.set(ylabel="searches/s")
    latency.plot(ends, [percentiles_ms([o.seconds for o in b])[1] for b in buckets], color="tab:red",
                 label=f"search p95 per {window:.0f} s")
    latency.set(xlabel="seconds", ylabel="p95 (ms)")
    for axis in (replicas, rate, latency):
        for phase in phases:
            axis.axvspan(phase.start, phase.end, alpha=0.04 * phase.clients ** 0.5, color="gray")
        axis.legend(fontsize=8, loc="upper right")
        axis.grid(alpha=0.3)
    for phase in phases:
        replicas.text(phase.start + 2, 0.2, f"{phase.clients} client(s)", fontsize=8)
    replicas.set_ylim(bottom=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def phase_table(rows: Sequence[PhaseRow]) -> str:
    lines = ["| phase | clients | from-to s | searches/s | p50 ms | p95 ms | failed | most replicas (control / treatment / embedder) | at its end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for number, row in enumerate(rows, start=1):
        most = " / ".join(str(row.most[n]) for n in WATCHED)
        last = " / ".join(str(row.last.get(n, 0)) for n in WATCHED)
        lines.append(f"| {number} | {row.clients} | {row.start:.0f}-{row.end:.0f} | {row.per_s:.1f} | {row.p50_ms:.0f} | "
                     f"{row.p95_ms:.0f} | {row.failed} | {most} | {last} |")
    return "\n".join(lines)


def fixed_table(fixed: dict[int, list[Outcome]], seconds: float, autoscaled: PhaseRow) -> str:
    if not fixed:
        return "Fixed control replicas: not measured in this run (`--fixed-seconds 0`)."
    base = len([o for o in fixed[1] if o.ok]) / seconds
    lines = [f"Throughput at {autoscaled.clients} clients, {seconds:.0f} s measured after 10 s of warm-up, against "
             "a fixed control count (treatment and embedder pinned at 1), and the autoscaled ramp's busiest phase:",
             "", "| control replicas | searches/s | vs 1 replica | p50 ms | p95 ms | failed |", "|---|---|---|---|---|---|"]
    for count, done in fixed.items():
        ok = [o for o in done if o.ok]
        p50, p95, _ = percentiles_ms([o.seconds for o in ok])
        lines.append(f"| {count} (fixed) | {len(ok) / seconds:.1f} | {len(ok) / seconds / base:.2f}x | {p50:.0f} | "
                     f"{p95:.0f} | {len(done) - len(ok)} |")
    lines.append(f"| autoscaled (busiest phase, up to {autoscaled.most[ARM_CONTROL]} control, "
                 f"{autoscaled.most[EMBEDDER]} embedder) | {autoscaled.per_s:.1f} | {autoscaled.per_s / base:.2f}x | "
                 f"{autoscaled.p50_ms:.0f} | {autoscaled.p95_ms:.0f} | {autoscaled.failed} |")
    return "\n".join(lines)


def section_body(args: argparse.Namespace, rows: Sequence[PhaseRow], found: Sequence[tuple[str, bool]],
                 fixed: dict[int, list[Outcome]], other_share: float, command: str) -> str:
    busiest = max(rows, key=lambda r: r.clients)
    check_lines = "\n".join(f"- {'pass' if ok else 'FAIL'}: {what}" for what, ok in found)
    return f"""Run {datetime.date.today().isoformat()} on {os.cpu_count()} cores; command (from the repository root):

```
{command}
```

A cluster as `dtrag up` starts it, with the deployment options of `configs/serve.yaml` except the
delays, shortened for this run to up {args.upscale_delay:g} s and down {args.downscale_delay:g} s (shipped: 15 s and
300 s) through a copy of the file named by `DTRAG_SERVE_CONFIG`; Ray was given {args.ray_cpus} logical CPUs
(`DTRAG_RAY_NUM_CPUS`) so that every replica up to its maximum can be placed on the {os.cpu_count()} cores.
Closed-loop clients search {'the sample corpus' if args.dataset is None else args.dataset.name}'s judged queries (searches
only, no feedback: the load is on the search path); the treatment arm gets no traffic (rollout weight 0), so it
stays at its minimum. Replicas are Serve's running count, asked every second. Processes outside the
cluster used {other_share:.0%} of the cores during the ramp (an upper bound: replicas started during it
count as outside); well above 0, the timings are pessimistic.

Replicas, searches/s and p95 over time: `{relative(args.plot)}`.

{phase_table(rows)}

{check_lines}

{fixed_table(fixed, args.fixed_seconds, busiest)}

The busiest phase's figures include the time before the first added replicas ran: Serve averages
each replica's ongoing requests over `look_back_period_s` (30 s by default) and then waits the
upscale delay, and a new replica takes seconds to start. Extra replicas on one node share its
cores, so here the cores, not the replica count, bound throughput (fixed 1 vs 2 control
replicas); the added replicas pay on a cluster, where the Ray autoscaler gives them nodes.
"""


# --- the run ----------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, settings: Settings, url: str, key: str,
                  ) -> tuple[list[Outcome], list[Sample], list[Phase], dict[int, list[Outcome]], float]:
    """The ramp, then the fixed counts; also the share of the cores other processes used in the ramp."""
    judged = judged_queries(args.dataset)
    other = OtherWork(cluster_processes(args.state_dir))  # replicas started later count as other: an upper bound
    outcomes, samples, phases = await ramp(url, key, judged, args.phases, args.report_every)
    other_share = other.share()
    print(f"processes outside the cluster used {other_share:.0%} of the cores during the ramp", flush=True)
    fixed: dict[int, list[Outcome]] = {}
    busiest = max(phase.clients for phase in phases)
    for control in (1, 2) if args.fixed_seconds > 0 else ():
        print(f"fixed {control} control replica(s): redeploying, then {busiest} clients", flush=True)
        await asyncio.to_thread(deploy_app, pinned(settings, control), url, 300.0)
        fixed[control] = await fixed_load(url, key, judged, busiest, args.fixed_seconds)
        print(f"  {len([o for o in fixed[control] if o.ok]) / args.fixed_seconds:.1f} searches/s", flush=True)
    return outcomes, samples, phases, fixed, other_share


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = ".venv/bin/python bench/autoscale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    os.environ["DTRAG_SERVE_CONFIG"] = str(with_delays(args.state_dir, args.upscale_delay, args.downscale_delay))
    os.environ["DTRAG_RAY_NUM_CPUS"] = str(args.ray_cpus)
    print(f"starting a cluster (state in {args.state_dir}) ...", flush=True)
    with running_cluster(args.state_dir, HTTP_PORT, METRICS_PORT, "bench-autoscale") as (settings, url, key):
        outcomes, samples, phases, fixed, other_share = asyncio.run(measure(args, settings, url, key))
    rows = phase_rows(outcomes, samples, phases)
    found = checks(rows)
    plot(outcomes, samples, phases, args.plot)
    replace_section(args.results, SECTION, section_body(args, rows, found, fixed, other_share, command.strip()))
    print(phase_table(rows), "", *(f"{'pass' if ok else 'FAIL'}: {what}" for what, ok in found), "",
          fixed_table(fixed, args.fixed_seconds, max(rows, key=lambda r: r.clients)), sep="\n")
    print(f"wrote {relative(args.plot)} and the section of {relative(args.results)}")
    return 0 if all(ok for _, ok in found) else 1


if __name__ == "__main__":
    sys.exit(main())
