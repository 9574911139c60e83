"""What Ray's dashboard and job server cost in memory, against the same local Ray without them.

`dtrag up` starts its local Ray with the dashboard on (127.0.0.1:DTRAG_DASHBOARD_PORT), because
Ray's job server, which `ray job submit`, `serve status` and `serve deploy` talk to, lives in it.
This measures what that adds: a local Ray started the way `dtrag up` starts it (token required,
loopback only), once with the dashboard port 0 (off) and once with a port, each left to settle,
then the resident memory (RSS) and unique memory (USS: what stopping the process would free) of
every process of the session, by Ray's process title. Processes are this script's descendants
(a local Ray starts its processes as our children). It also lists every socket those processes
listen on, and fails if one is off loopback.

    .venv/bin/python bench/job_server_memory.py [--settle 20]

It writes the section "## Job server memory" of `bench/RESULTS.md`.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

from _harness import BENCH, process_role, replace_section  # noqa: E402
from cluster.platform.runtime import free_port, start_ray  # noqa: E402
from cluster.platform.settings import load_settings  # noqa: E402

MIB = 1024 * 1024


@dataclasses.dataclass
class Phase:
    rss: dict[str, float]  # MiB by process title, summed over processes with that title
    uss: dict[str, float]
    counts: dict[str, int]
    listening: list[str]


def measure(settle_s: float) -> Phase:
    time.sleep(settle_s)
    rss: dict[str, float] = collections.defaultdict(float)
    uss: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    listening = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = process_role(process)
            info = process.memory_full_info()
            sockets = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        rss[title] += info.rss / MIB
        uss[title] += info.uss / MIB
        counts[title] += 1
        listening += [f"{c.laddr.ip}:{c.laddr.port} {title}" for c in sockets if c.status == psutil.CONN_LISTEN]
    return Phase(dict(rss), dict(uss), dict(counts), sorted(listening))


def run_phase(dashboard_port: int, settle_s: float, state_dir: Path) -> Phase:
    import ray

    settings = load_settings(environ={"DTRAG_STATE_DIR": str(state_dir), "DTRAG_METRICS_PORT": str(free_port()),
                                      "DTRAG_DASHBOARD_PORT": str(dashboard_port)})
    start_ray(settings.ray, state_dir=settings.state_dir)
    try:
        return measure(settle_s)
    finally:
        ray.shutdown()
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)


def off_loopback(listening: list[str]) -> list[str]:
    return [line for line in listening if not line.split(" ")[0].rsplit(":", 1)[0].strip("[]")
            .removeprefix("::ffff:").startswith("127.")]


def report(off: Phase, on: Phase, command: str, settle_s: float) -> str:
    titles = sorted(set(off.rss) | set(on.rss), key=lambda t: -(on.rss.get(t, 0) - off.rss.get(t, 0)))
    lines = [
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 1024**3:.0f} GiB. Settled {settle_s:.0f} s before measuring.",
        "", "Command (from the repository root):", "", "```", command, "```", "",
        "A local Ray started as `dtrag up` starts it (token required, 127.0.0.1 only), without the app, "
        "once with `DTRAG_DASHBOARD_PORT=0` and once with the dashboard on. MiB per process title "
        "(summed when several share it); USS is memory only that process holds.", "",
        "| process | off: RSS | off: USS | on: RSS | on: USS |", "|---|---:|---:|---:|---:|",
    ]
    for title in titles:
        def cell(phase: Phase, values: dict[str, float]) -> str:
            count = phase.counts.get(title, 0)
            return "-" if not count else f"{values[title]:.0f}" + (f" ({count})" if count > 1 else "")
        lines.append(f"| `{title}` | {cell(off, off.rss)} | {cell(off, off.uss)} | {cell(on, on.rss)} | {cell(on, on.uss)} |")
    total = {name: (sum(phase.rss.values()), sum(phase.uss.values())) for name, phase in (("off", off), ("on", on))}
    lines.append(f"| **all** | **{total['off'][0]:.0f}** | **{total['off'][1]:.0f}** | "
                 f"**{total['on'][0]:.0f}** | **{total['on'][1]:.0f}** |")
    extra_rss, extra_uss = total["on"][0] - total["off"][0], total["on"][1] - total["off"][1]
    lines += ["", f"- The dashboard and job server add {extra_rss:.0f} MiB RSS ({extra_uss:.0f} MiB USS); "
              f"on / off: {total['on'][0] / total['off'][0]:.2f}x RSS, {total['on'][1] / total['off'][1]:.2f}x USS.",
              "- RSS counts memory shared between processes once per process, and the dashboard's modules "
              "are forked from one server and share most of theirs: USS, what stopping them frees, is the "
              "cost. Each running job adds a `JobSupervisor` actor and its driver while it runs; "
              "`DTRAG_DASHBOARD_PORT=0` saves this memory and turns jobs off.",
              f"- Listening sockets with the dashboard on ({len(on.listening)}), all on loopback: "
              + ", ".join(f"`{line}`" for line in on.listening) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle", type=float, default=20.0, help="seconds to wait after start")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jsm-") as state:
        off = run_phase(0, args.settle, Path(state))
        on = run_phase(free_port(), args.settle, Path(state))
    for phase in (off, on):
        bad = off_loopback(phase.listening)
        if bad:
            raise SystemExit(f"listening off loopback: {bad}")
    command = ".venv/bin/python bench/job_server_memory.py" + (f" --settle {args.settle:g}" if args.settle != 20 else "")
    body = report(off, on, command, args.settle)
    print(body)
    replace_section(BENCH / "RESULTS.md", "## Job server memory", body)


if __name__ == "__main__":
    main()
