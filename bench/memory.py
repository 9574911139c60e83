"""Resident memory of a single-node `dtrag up`, per process, against a baseline revision in the same run.

Starts `dtrag up` as a user does (`python -m cluster.cli.main up`, a fresh state folder, so it
loads the sample corpus into its embedded PostgreSQL, and ports of its own), waits for the demo
key it prints, runs a few searches, lets it settle, then reads every process of the cluster:
the `dtrag up` process and its descendants (Ray's gcs_server, raylet, dashboard and its modules,
agents, monitors, Serve's controller, proxy and replicas, the cluster's actors, idle workers), and
the embedded PostgreSQL's postmaster with its children. Then it stops `dtrag up` with SIGTERM,
as Ctrl-C would, and does the same for the baseline: the revision `--baseline` (default `main`)
extracted with `git archive` and run from there.

Per process it reports RSS, PSS and USS (psutil's `memory_full_info`, from /proc/PID/smaps):
- RSS counts every page a process maps, shared ones (the Python interpreter, Ray's and torch's
  libraries, pages a forked dashboard module shares with its fork server) once per process, so
  summing it over processes counts shared pages many times over.
- PSS charges each shared page to its sharers in equal parts: its sum over the processes is the
  memory the cluster holds. That sum is "the resident memory of the cluster", and the target.
- USS is what stopping just that process frees.

    .venv/bin/python bench/memory.py [--baseline main] [--searches 20] [--settle 30]

It writes the section "## Memory: dtrag up per process" of `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from _harness import BENCH, REPO, Judged, cluster_processes, replace_section
from cluster.platform.runtime import free_port

MIB = 1024 * 1024
GIB = 1024 * MIB
TARGET_GIB = 3.0


@dataclasses.dataclass(frozen=True)
class Usage:
    """Bytes of one role, summed over its processes."""

    count: int
    rss: int
    pss: int
    uss: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    label: str
    by_role: dict[str, Usage]

    def total(self, field: str) -> int:
        return sum(getattr(usage, field) for usage in self.by_role.values())


def _start(source: Path, state: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`dtrag up` running the code at `source`; returns it, its URL and the demo key it prints."""
    http_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source), "DTRAG_STATE_DIR": str(state),
           "DTRAG_HTTP_PORT": str(http_port), "DTRAG_METRICS_PORT": str(free_port()),
           "DTRAG_DASHBOARD_PORT": str(free_port())}
    for name in ("DATABASE_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli.main", "up"], cwd=source, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # blocks until it prints the key or exits
        seen.append(line)
        print(f"    | {line.rstrip()}", flush=True)
        if line.startswith("demo API key"):
            return process, f"http://127.0.0.1:{http_port}", line.rsplit(" ", 1)[1].strip()
    process.wait()
    raise RuntimeError(f"dtrag up at {source} exited with {process.returncode} before serving:\n" + "".join(seen))


def _search(url: str, key: str, searches: int) -> None:
    queries = Judged.sample().queries
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as client:
        for i in range(searches):
            response = client.post("/api/v1/search/", json={"q": queries[i % len(queries)], "final_topk": 10})
            if response.status_code != 200:
                raise RuntimeError(f"search {i}: HTTP {response.status_code}: {response.text[:300]}")


def snapshot(label: str, roles: dict[int, str]) -> Snapshot:
    usage: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    for pid, role in roles.items():
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        entry = usage[role]
        entry[0] += 1
        entry[1] += info.rss
        entry[2] += info.pss
        entry[3] += info.uss
    return Snapshot(label, {role: Usage(*values) for role, values in usage.items()})


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, as Ctrl-C: `dtrag up` stops Ray, Serve and PostgreSQL itself."""
    process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError("dtrag up did not stop within 120 s of SIGTERM") from None


def measure(label: str, source: Path, searches: int, settle_s: float) -> Snapshot:
    print(f"[{label}] dtrag up from {source} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="dtrag-mem-") as state:
        process, url, key = _start(source, Path(state))
        try:
            print(f"[{label}] serving; {searches} searches, then {settle_s:.0f} s to settle", flush=True)
            _search(url, key, searches)
            time.sleep(settle_s)  # Ray starts and retires idle workers for a while after a deploy
            result = snapshot(label, cluster_processes(Path(state), psutil.Process(process.pid), "dtrag up"))
        finally:
            _stop(process)
    print(f"[{label}] PSS {result.total('pss') / GIB:.2f} GiB, RSS {result.total('rss') / GIB:.2f} GiB "
          f"over {sum(u.count for u in result.by_role.values())} processes", flush=True)
    return result


@contextlib.contextmanager
def checkout(revision: str):
    """The files of `revision` in a temporary folder (`git archive`: no worktree to clean up)."""
    with tempfile.TemporaryDirectory(prefix="dtrag-base-") as folder:
        archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder)


def _mib(value: int) -> str:
    return f"{value / MIB:.0f}"


def report(base: Snapshot, tuned: Snapshot, command: str, searches: int, settle_s: float) -> str:
    roles = sorted(base.by_role.keys() | tuned.by_role.keys(),
                   key=lambda r: -max(s.by_role[r].pss if r in s.by_role else 0 for s in (base, tuned)))
    none = Usage(0, 0, 0, 0)
    lines = [
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB.", "", "Command (from the repository root):", "",
        "```", command, "```", "",
        f"`dtrag up` as a user runs it (fresh state folder: the sample corpus is loaded), {searches} searches, "
        f"{settle_s:.0f} s to settle, then every process of the cluster. MiB per role (summed when several "
        f"processes share it; their number in brackets). **{base.label}** is that revision run from a "
        f"`git archive` of it, **{tuned.label}** this working tree, in the same run.", "",
        f"| process | {base.label}: RSS | PSS | USS | {tuned.label}: RSS | PSS | USS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for role in roles:
        cells = []
        for shot in (base, tuned):
            usage = shot.by_role.get(role, none)
            count = f" ({usage.count})" if usage.count > 1 else ""
            cells += ["-"] * 3 if not usage.count else [_mib(usage.rss) + count, _mib(usage.pss), _mib(usage.uss)]
        lines.append(f"| `{role}` | " + " | ".join(cells) + " |")
    sums = [f"**{_mib(shot.total(field))}**" for shot in (base, tuned) for field in ("rss", "pss", "uss")]
    lines.append("| **sum** | " + " | ".join(sums) + " |")
    pss = {shot.label: shot.total("pss") / GIB for shot in (base, tuned)}
    rss = {shot.label: shot.total("rss") / GIB for shot in (base, tuned)}
    lines += [
        "",
        f"- Resident memory of the cluster (PSS sum): {base.label} {pss[base.label]:.2f} GiB, {tuned.label} "
        f"{pss[tuned.label]:.2f} GiB: {pss[tuned.label] / pss[base.label]:.2f}x; target under {TARGET_GIB:g} GiB: "
        f"{'met' if pss[tuned.label] < TARGET_GIB else 'NOT met'}.",
        f"- RSS sum (counts shared pages once per process, so it overstates): {base.label} "
        f"{rss[base.label]:.2f} GiB, {tuned.label} {rss[tuned.label]:.2f} GiB: "
        f"{rss[tuned.label] / rss[base.label]:.2f}x.",
        f"- Largest in {tuned.label} by PSS: " + ", ".join(
            f"`{role}` {tuned.by_role[role].pss / MIB:.0f} MiB" for role in
            sorted(tuned.by_role, key=lambda r: -tuned.by_role[r].pss)[:4]) + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision to compare against (default: main)")
    parser.add_argument("--searches", type=int, default=20, help="searches before measuring")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds between the searches and the reading")
    parser.add_argument("--no-baseline", action="store_true", help="measure only this working tree")
    args = parser.parse_args()
    tuned = measure("this tree", REPO, args.searches, args.settle)
    if args.no_baseline:
        print(report(tuned, tuned, "", args.searches, args.settle))
        return
    with checkout(args.baseline) as folder:
        base = measure(args.baseline, folder, args.searches, args.settle)
    command = ".venv/bin/python bench/memory.py" + "".join(
        f" --{name} {value}" for name, value, default in (("baseline", args.baseline, "main"),
                                                          ("searches", args.searches, 20),
                                                          ("settle", f"{args.settle:g}", "30")) if value != default)
    body = report(base, tuned, command, args.searches, args.settle)
    print(body)
    replace_section(BENCH / "RESULTS.md", "## Memory: dtrag up per process", body)


if __name__ == "__main__":
    main()
