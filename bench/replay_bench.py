"""Prioritized replay: learners.replay against RLlib's buffer and a per-sample pure-Python sum tree.

    .venv/bin/python bench/replay_bench.py

Each buffer is filled to capacity (1e4, 1e5, 1e6 by default), then we time, per call: add of one
experience and of a batch of 256, stratified prioritized sample of 32 and 256 (indices, weights
and stored fields), the tree search alone for 32 and 256 prefix sums, and update_priorities of
32 and 256 sampled slots. The machine's speed drifts by up to 2x within seconds (a shared VM), so
each operation is timed in short rounds interleaved across the three buffers and the fastest
round of each is kept. Writes the "## Prioritized replay" section of bench/RESULTS.md and exits
non-zero if sampling is not >= 10x faster than RLlib and faster than the Python tree.
Needs `pip install 'ray[rllib]==2.60.0'`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import random
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from learners.replay import PrioritizedReplayBuffer, experience_columns  # noqa: E402

ALPHA, BETA, EPS = 0.6, 0.4, 1e-6
CONTEXT_DIM = 14  # len(learners.context.FEATURES)
N_ACTIONS = 7  # the retrieval head's actions at the default fusion grid
BETA_STEPS = 100_000  # samples over which beta0 anneals to 1: the buffer's former default
ADD_BATCH = 256
SAMPLE_BATCHES = (32, 256)
ROUNDS = 15
ROUND_SECONDS = 0.01
SECTION = "## Prioritized replay"


class PythonSumTreeBuffer:
    """The straightforward baseline: a binary sum tree in a Python list, one descent per sample."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.leaf0 = 1 << (capacity - 1).bit_length()  # index of leaf 0; tree[1] is the root
        self.tree = [0.0] * (2 * self.leaf0)
        self.items: list[tuple] = [()] * capacity
        self.insertion_ids = [-1] * capacity
        self.num_added = 0
        self.max_priority = 1.0
        self.rng = random.Random(seed)

    def _set(self, slot: int, priority: float) -> None:
        node = slot + self.leaf0
        self.tree[node] = priority
        node //= 2
        while node:
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]
            node //= 2

    def find(self, value: float) -> int:
        node = 1
        while node < self.leaf0:
            left = self.tree[2 * node]
            if value < left:
                node = 2 * node
            else:
                value -= left
                node = 2 * node + 1
        return min(node - self.leaf0, min(self.num_added, self.capacity) - 1)

    def add(self, items: list[tuple]) -> None:
        for item in items:
            slot = self.num_added % self.capacity
            self.items[slot] = item
            self.insertion_ids[slot] = self.num_added
            self._set(slot, self.max_priority)
            self.num_added += 1

    def sample(
        self, batch_size: int, beta: float
    ) -> tuple[list[int], list[int], list[float], list[tuple]]:
        total = self.tree[1]
        segment = total / batch_size
        indices = [self.find((k + self.rng.random()) * segment) for k in range(batch_size)]
        n = min(self.num_added, self.capacity)
        weights = [(n * self.tree[i + self.leaf0] / total) ** -beta for i in indices]
        max_weight = max(weights)
        return (
            indices,
            [self.insertion_ids[i] for i in indices],
            [w / max_weight for w in weights],
            [self.items[i] for i in indices],
        )

    def update_priorities(
        self, indices: list[int], insertion_ids: list[int], td_errors: list[float]
    ) -> None:
        for slot, insertion_id, td_error in zip(indices, insertion_ids, td_errors):
            if self.insertion_ids[slot] == insertion_id:
                priority = (abs(td_error) + EPS) ** ALPHA
                self._set(slot, priority)
                self.max_priority = max(self.max_priority, priority)


def columns(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """n synthetic experiences, as columns: the service's, with a context of CONTEXT_DIM numbers."""
    k = np.arange(start, start + n)
    context = ((k[:, None] + np.arange(CONTEXT_DIM)) % 97 / 97).astype(np.float32)
    return {
        "context": context,
        "fold": k % 5,
        "action": k % 7,
        "reward": (k % 10) / 10,
        "propensity": np.full(n, 1 / 7),
        "next_context": np.zeros_like(context),
        "has_next": np.zeros(n, bool),
        "policy_version": k // 1000,
    }


class Ours:
    name = "ours"

    def __init__(self, capacity: int) -> None:
        self.buffer = PrioritizedReplayBuffer(
            capacity, experience_columns(CONTEXT_DIM, N_ACTIONS), alpha=ALPHA, beta0=BETA, beta_steps=BETA_STEPS, eps=EPS,
            seed=0,
        )

    def fill(self, start: int, n: int) -> None:
        self.buffer.add(columns(n, start))

    def add_op(self, n: int) -> Callable[[], object]:
        batch = columns(n)
        return lambda: self.buffer.add(batch)

    def sample_op(self, batch_size: int) -> Callable[[], object]:
        return lambda: self.buffer.sample(batch_size)

    def search_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        tree = self.buffer._tree
        prefix = np.sort(rng.random(batch_size)) * tree.total
        return lambda: tree.find_prefix_sum(prefix)

    def update_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        sample, td = self.buffer.sample(batch_size), rng.random(batch_size)
        return lambda: self.buffer.update_priorities(sample.indices, sample.insertion_ids, td)


class RLlib:
    name = "rllib"

    def __init__(self, capacity: int) -> None:
        from ray.rllib.utils.replay_buffers import PrioritizedReplayBuffer as RLlibBuffer

        self.buffer = RLlibBuffer(capacity=capacity, alpha=ALPHA)

    @staticmethod
    def batch(n: int, start: int = 0):
        from ray.rllib.policy.sample_batch import SampleBatch

        c = columns(n, start)
        return SampleBatch(
            {
                "obs": c["context"],
                "actions": c["action"].astype(np.int16),
                "rewards": c["reward"].astype(np.float32),
                "action_prob": c["propensity"].astype(np.float32),
                "new_obs": c["next_context"],
                "policy_version": c["policy_version"].astype(np.int32),
            }
        )

    def fill(self, start: int, n: int) -> None:
        self.buffer.add(self.batch(n, start))

    def add_op(self, n: int) -> Callable[[], object]:
        batch = self.batch(n)
        return lambda: self.buffer.add(batch)

    def sample_op(self, batch_size: int) -> Callable[[], object]:
        return lambda: self.buffer.sample(batch_size, beta=BETA)

    def search_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        tree = self.buffer._it_sum
        prefix = (np.sort(rng.random(batch_size)) * tree.sum()).tolist()
        return lambda: [tree.find_prefixsum_idx(v) for v in prefix]

    def update_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        indices = self.buffer.sample(batch_size, beta=BETA)["batch_indexes"]
        priorities = rng.random(batch_size) + EPS  # RLlib raises them to alpha itself
        return lambda: self.buffer.update_priorities(indices, priorities)


class PythonTree:
    name = "python tree"

    def __init__(self, capacity: int) -> None:
        self.buffer = PythonSumTreeBuffer(capacity)

    @staticmethod
    def items(n: int, start: int = 0) -> list[tuple]:
        return list(zip(*(column.tolist() for column in columns(n, start).values())))

    def fill(self, start: int, n: int) -> None:
        self.buffer.add(self.items(n, start))

    def add_op(self, n: int) -> Callable[[], object]:
        items = self.items(n)
        return lambda: self.buffer.add(items)

    def sample_op(self, batch_size: int) -> Callable[[], object]:
        return lambda: self.buffer.sample(batch_size, BETA)

    def search_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        prefix = (np.sort(rng.random(batch_size)) * self.buffer.tree[1]).tolist()
        return lambda: [self.buffer.find(v) for v in prefix]

    def update_op(self, batch_size: int, rng: np.random.Generator) -> Callable[[], object]:
        indices, insertion_ids, _, _ = self.buffer.sample(batch_size, BETA)
        td = rng.random(batch_size).tolist()
        return lambda: self.buffer.update_priorities(indices, insertion_ids, td)


Impl = Ours | RLlib | PythonTree


def fill(impl: Impl, capacity: int) -> float:
    """Fill to capacity in chunks, with progress on stderr; returns seconds."""
    chunk = min(capacity, 10_000)
    start = time.perf_counter()
    for offset in range(0, capacity, chunk):
        impl.fill(offset, min(chunk, capacity - offset))
        done, seconds = min(offset + chunk, capacity) / capacity, time.perf_counter() - start
        print(
            f"\r  fill {impl.name:<11} {capacity:>9,}: {done:4.0%} {seconds:6.1f} s",
            end="",
            file=sys.stderr,
        )
    print(file=sys.stderr)
    return time.perf_counter() - start


def time_interleaved(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Microseconds per call of each callable: fastest of ROUNDS rounds, rounds interleaved."""
    repeats = {}
    for name, call in calls.items():  # calibrate: calls per ~ROUND_SECONDS round
        start = time.perf_counter()
        call()
        repeats[name] = max(1, int(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7)))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(ROUNDS):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / repeats[name] * 1e6)
    return best


def bench_capacity(capacity: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """{operation: {impl name: us per call}} and {impl name: fill seconds}."""
    rng = np.random.default_rng(0)
    impls: list[Impl] = [Ours(capacity), RLlib(capacity), PythonTree(capacity)]
    fill_seconds = {impl.name: fill(impl, capacity) for impl in impls}
    gc.collect()
    results: dict[str, dict[str, float]] = {}

    def run(op: str, calls: dict[str, Callable[[], object]]) -> None:
        results[op] = time_interleaved(calls)
        timings = ", ".join(f"{name} {us:,.1f} us" for name, us in results[op].items())
        print(f"  {capacity:>9,} {op:<15} {timings}", file=sys.stderr)

    for b in SAMPLE_BATCHES:
        run(f"sample {b}", {impl.name: impl.sample_op(b) for impl in impls})
    for b in SAMPLE_BATCHES:
        run(f"tree search {b}", {impl.name: impl.search_op(b, rng) for impl in impls})
    for b in SAMPLE_BATCHES:
        run(f"update {b}", {impl.name: impl.update_op(b, rng) for impl in impls})
    for n in (1, ADD_BATCH):  # last: adds overwrite the slots the updates were sampled from
        run(f"add {n}", {impl.name: impl.add_op(n) for impl in impls})
    return results, fill_seconds


def markdown_table(all_results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| capacity | operation | ours (us) | RLlib (us) | Python tree (us) | RLlib / ours | Python tree / ours |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for capacity, results in all_results.items():
        for op, us in results.items():
            lines.append(
                f"| {capacity:,} | {op} | {us['ours']:,.1f} | {us['rllib']:,.1f} | {us['python tree']:,.1f} "
                f"| {us['rllib'] / us['ours']:,.1f}x | {us['python tree'] / us['ours']:,.2f}x |"
            )
    return "\n".join(lines)


def check_targets(all_results: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """Failures of: sample >= 10x faster than RLlib and faster than the Python tree."""
    failures = []
    for capacity, results in all_results.items():
        for b in SAMPLE_BATCHES:
            us = results[f"sample {b}"]
            if us["rllib"] < 10 * us["ours"]:
                failures.append(
                    f"capacity {capacity:,} sample {b}: only {us['rllib'] / us['ours']:.1f}x faster than RLlib"
                )
            if us["python tree"] <= us["ours"]:
                failures.append(
                    f"capacity {capacity:,} sample {b}: not faster than the Python tree"
                )
    return failures


def write_section(path: Path, body: str) -> None:
    """Replace (or append) our section of RESULTS.md, leaving the others' sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument(
        "--no-write", action="store_true", help="print only, leave RESULTS.md alone"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # RLlib's capacity and deprecation warnings
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    all_results, fills = {}, {}
    for capacity in args.capacities:
        all_results[capacity], fills[capacity] = bench_capacity(capacity)
        gc.collect()
    memory = PrioritizedReplayBuffer(10_000, experience_columns(CONTEXT_DIM, N_ACTIONS), alpha=ALPHA, beta0=BETA,
                                     beta_steps=BETA_STEPS)
    memory.add(columns(10_000))
    failures = check_targets(all_results)
    command = f"{os.path.relpath(sys.executable)} {shlex.join(sys.argv)}"
    summary = [
        "Fill to capacity (s): "
        + "; ".join(
            f"{c:,}: " + ", ".join(f"{name} {s:.1f}" for name, s in f.items())
            for c, f in fills.items()
        ),
        (
            f"Memory: `PrioritizedReplayBuffer(10_000).nbytes` after 10,000 adds = {memory.nbytes:,} "
            f"bytes ({memory.nbytes / 1e6:.2f} MB): columns, insertion ids and sum tree."
        ),
        (
            "Targets (sample >= 10x faster than RLlib and faster than the Python tree, at every "
            "capacity and batch): "
            + ("met." if not failures else "NOT met: " + "; ".join(failures))
        ),
    ]
    table = markdown_table(all_results)
    print(table, *summary, sep="\n\n")
    if not args.no_write:
        body = "\n\n".join(
            [
                (
                    f"Command: `{command}`  \n"
                    f"Date: {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs "
                    f"({platform.machine()}), Python {platform.python_version()}, "
                    f"numpy {np.__version__}; the run took {time.perf_counter() - started:.0f} s."
                ),
                (
                    f"Microseconds per call, fastest of {ROUNDS} interleaved rounds (this VM's speed "
                    "drifts up to 2x). `sample b`: stratified prioritized draw of b experiences with "
                    "importance weights and stored fields; `tree search b`: the prefix-sum search "
                    "alone; `update b`: new priorities for b sampled slots; `add n`: n experiences "
                    "into a full buffer. Baselines: RLlib 2.60 `PrioritizedReplayBuffer` (timestep "
                    "storage) and a binary sum tree in a Python list with one descent per sample "
                    "(in the bench file)."
                ),
                table,
                *summary,
            ]
        )
        write_section(args.results, body)
        print(f"wrote {SECTION!r} in {args.results}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
