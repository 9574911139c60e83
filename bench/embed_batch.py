"""Query embedding: CPU per query by batch size, the figure behind the embedder's batching, and
whether batching moves a query's vector.

Embeds the dataset's queries with the bundled model on one torch thread, as the embedder
replica runs it, in batches of each size in turn; the sizes take turns over several passes and
the fastest pass of each is kept (the machine's pace drifts within seconds). Reports CPU
milliseconds per query, and each size against batches of one measured in the same run.

    .venv/bin/python bench/embed_batch.py --dataset $DATA/scifact
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from _harness import BENCH, replace_section
from cluster.data.beir import load_queries
from cluster.data.corpus import sample_corpus_dir
from serve_app.embedding import TextEmbedder

SECTION = "## Embedder: CPU per query by batch size"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=sample_corpus_dir(),
                        help="a folder with queries.jsonl (default: the sample corpus)")
    parser.add_argument("--queries", type=int, default=128, help="queries embedded per batch size and pass")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--passes", type=int, default=5, help="passes over every size; the fastest is kept")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def embed_in_batches(model: TextEmbedder, queries: Sequence[str], size: int) -> tuple[float, np.ndarray]:
    """Process CPU per query, and the vectors (N, dim), embedding `queries` in batches of `size`."""
    started = time.process_time()
    batches = [model.encode(queries[first:first + size]) for first in range(0, len(queries), size)]
    cpu_ms = (time.process_time() - started) * 1000 / len(queries)
    return cpu_ms, np.concatenate(batches)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    queries = list(load_queries(args.dataset).values())
    queries = (queries * (args.queries // max(len(queries), 1) + 1))[: args.queries]
    model = TextEmbedder(threads=1)  # as the embedder replica: one thread for its one CPU
    model.encode(queries[:8])  # the first call pays for lazy initialisation
    best = {size: float("inf") for size in args.sizes}
    vectors: dict[int, np.ndarray] = {}
    for _ in tqdm(range(args.passes), desc="passes", unit="pass"):
        for size in args.sizes:
            cpu_ms, vectors[size] = embed_in_batches(model, queries, size)
            best[size] = min(best[size], cpu_ms)
    first = args.sizes[0]
    # Whether a query's vector depends on the queries batched with it (padding): what the live
    # embedder, batching whatever is waiting, would make of the same query at different times.
    rows = [f"| {size} | {ms:.1f} | {ms / best[first]:.2f} | {np.abs(vectors[size] - vectors[first]).max():.1e} |"
            for size, ms in best.items()]
    table = "\n".join([f"| queries per batch | CPU ms per query | vs batches of {first} | "
                       f"largest coordinate difference from batches of {first} |",
                       "|---:|---:|---:|---:|", *rows])
    print(table)
    command = shlex.join([".venv/bin/python", "bench/embed_batch.py", *sys.argv[1:]])
    replace_section(args.results, SECTION, f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores.

```
{command}
```

{args.queries} queries of `{args.dataset.name}` embedded by the bundled all-MiniLM-L6-v2 on one torch
thread (as the embedder replica runs it), in batches of each size; the fastest of {args.passes}
interleaved passes per size. Process CPU per query, and how far any coordinate of a query's unit
vector moved from its vector in batches of {first}:

{table}
""")
    print(f"wrote the embedder section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
