"""What an idle cluster costs: CPU of every process of a local Ray, with and without the app.

A service that learns and rolls out keeps background work going (replicas polling the control
plane and the policy, learners asking for batches, the rollout guard). This measures what that
costs when nobody searches, against a baseline in the same run: the same Ray with Serve's
controller and proxy but no application.

1. baseline: Ray + Serve, nothing deployed; settle, then sum the CPU time of every process of
   the Ray session (GCS, raylet, workers, controller, proxy) over `--seconds`;
2. app: the DT-RAG app deployed with the defaults (learning flags off, treatment at 0%), idle;
   settle, measure the same way.

It prints CPU per process role (% of one core) for both phases, the number of processes that
started during the measurement, and the whole machine's busy time, whose app / baseline ratio is
the headline (it also counts short-lived processes, such as workers Ray starts for tasks, which
the per-role sums miss). Processes are found as descendants of this script (a local Ray starts
its processes as our children); the embedded PostgreSQL runs detached, so it shows only in the
machine's total. Run it on an otherwise quiet machine.

    .venv/bin/python bench/idle_cpu.py [--state-dir /tmp/idle-state] [--seconds 60]

It writes the section "## Idle CPU" of `bench/RESULTS.md`. Serve listens on 127.0.0.1:8400 and
Ray's metrics exporter on 127.0.0.1:9400.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import asyncio  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _harness import (  # noqa: E402
    BENCH,
    deploy_app,
    local_settings,
    machine_busy_seconds,
    prepare_database,
    process_cpu_seconds,
    process_role,
    ray_serve,
    relative,
    replace_section,
    revoke,
)
from cluster.platform.database import resolve_database_url  # noqa: E402
from cluster.platform.settings import load_settings  # noqa: E402

HTTP_PORT = 8400
METRICS_PORT = 9400
SECTION = "## Idle CPU"
SETTLE_S = 20.0
DEPLOY_TIMEOUT_S = 300.0



@dataclasses.dataclass(frozen=True)
class Measurement:
    """CPU over one measurement, as % of one core."""

    by_role: dict[str, float]  # this script's descendants that lived through the measurement
    started: int  # descendants that were not there at its start
    machine: float  # every core's busy time: also what short-lived processes used

    @property
    def processes(self) -> float:
        return sum(self.by_role.values())


def cpu_seconds(processes: Sequence[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):  # a process may exit meanwhile
            seconds[process.pid] = process_cpu_seconds(process)
    return seconds


def measure(seconds: float, label: str) -> Measurement:
    """CPU per role of this process's descendants (not itself) over `seconds`, and the machine's.

    Processes that start or exit within the window (a worker Ray spawns for a task, for
    example) are missed per role; the machine's busy time includes them.
    """
    processes = psutil.Process().children(recursive=True)
    before, machine_before = cpu_seconds(processes), machine_busy_seconds()
    for _ in tqdm(range(int(seconds)), desc=label, unit="s"):
        time.sleep(1)
    after, machine_after = cpu_seconds(processes), machine_busy_seconds()
    by_role: dict[str, float] = collections.defaultdict(float)
    for process in processes:
        if process.pid in before and process.pid in after:
            by_role[process_role(process)] += 100 * (after[process.pid] - before[process.pid]) / seconds
    started = {p.pid for p in psutil.Process().children(recursive=True)} - set(before)
    return Measurement(dict(by_role), len(started), 100 * (machine_after - machine_before) / seconds)


def settle(label: str) -> None:
    for _ in tqdm(range(int(SETTLE_S)), desc=f"settle ({label})", unit="s"):
        time.sleep(1)


def table(baseline: Measurement, app: Measurement) -> str:
    roles = sorted(baseline.by_role.keys() | app.by_role.keys(), key=lambda r: -app.by_role.get(r, 0.0))
    lines = ["| process | baseline: Ray + Serve (% of a core) | app idle (% of a core) |",
             "|---|---:|---:|"]
    lines += [f"| `{r}` | {baseline.by_role.get(r, 0.0):.1f} | {app.by_role.get(r, 0.0):.1f} |" for r in roles
              if max(baseline.by_role.get(r, 0.0), app.by_role.get(r, 0.0)) >= 0.05]
    lines.append(f"| **processes above** | **{baseline.processes:.1f}** | **{app.processes:.1f}** |")
    lines.append(f"| processes started meanwhile (count) | {baseline.started} | {app.started} |")
    lines.append(f"| **whole machine, busy** | **{baseline.machine:.1f}** | **{app.machine:.1f}** |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/idle-state"),
                        help="embedded database folder (the sample corpus is loaded if empty)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measurement")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = local_settings(load_settings(), HTTP_PORT, METRICS_PORT)
    settings = base.with_database_url(resolve_database_url(None, args.state_dir))
    assert settings.database.url
    key = asyncio.run(prepare_database(settings, "bench-idle-cpu"))
    load_at_start = os.getloadavg()[0]
    try:
        with ray_serve(settings) as url:
            settle("baseline")
            baseline = measure(args.seconds, "measure baseline")
            deploy_app(settings, url, DEPLOY_TIMEOUT_S)
            settle("app")
            app = measure(args.seconds, "measure app")
    finally:
        asyncio.run(revoke(settings.database.url, key))
    ratio = app.machine / max(baseline.machine, 1e-9)
    report = table(baseline, app)
    summary = (f"whole machine busy with the app idle: {app.machine:.1f}% of a core; baseline "
               f"{baseline.machine:.1f}%; app / baseline {ratio:.2f}")
    print(report)
    print(summary)
    body = "\n".join([
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {os.cpu_count()} cores; "
        f"1-minute load average {load_at_start:.2f} at the start.",
        "",
        "Command (from the repository root):",
        "",
        "```",
        f".venv/bin/python bench/idle_cpu.py --seconds {args.seconds:g}",
        "```",
        "",
        "CPU of every process of a local Ray over the measurement, nobody searching. Baseline: Ray",
        "with Serve's controller and proxy, nothing deployed. App: the DT-RAG app with the defaults",
        "(learning flags off, treatment arm at 0%). Roles are Ray's process titles; the whole",
        "machine's busy time also counts processes that started or exited within the measurement.",
        "",
        report,
        "",
        f"- {summary}.",
    ])
    replace_section(args.results, SECTION, body)
    print(f"wrote the section '{SECTION}' of {relative(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
