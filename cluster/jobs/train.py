"""Fit a candidate policy offline from exported logs, and write it as a versioned file.

    python -m cluster.jobs.train EXPORT_DIR [--until 2026-11-20] [--name NAME] [--out FILE]
    dtrag jobs submit train EXPORT_DIR --until 2026-11-20

Replays the export's rewarded searches (`cluster.jobs.export`), oldest first, through the learning
core the service runs (`learners.candidate.fit`): the same actions, features, reward (quality
minus cost weight x expected CPU ms), gates and hyperparameters, from the settings. Rows that
cannot teach (no feedback, no context, another feature count) are counted and skipped.

`--until` leaves the newest logs out, to judge the candidate on them with
`python -m cluster.jobs.ope EXPORT_DIR --candidate FILE --since SAME_DATE` before promoting it
with `dtrag policy promote FILE`, which judges it again on the service's own newest logs.

Writes FILE (default `STATE_DIR/policies/NAME.policy`): the `learners.candidate` format (a
versioned header, NumPy arrays and JSON; never pickle), with what it was trained on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from cluster.actors.start import learning_heads
from cluster.jobs.common import day, main
from cluster.jobs.logs import read_logs
from cluster.platform.settings import Settings
from learners.candidate import encode, fit
from learners.context import FEATURES

HEAD = "retrieval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", type=Path, help="an export folder (python -m cluster.jobs.export)")
    parser.add_argument("--since", type=day, help="train on searches served from this UTC date (YYYY-MM-DD)")
    parser.add_argument("--until", type=day, help="... and before this one (leave the newest out to judge on)")
    parser.add_argument("--name", help="the candidate's name (default: candidate-TIME)")
    parser.add_argument("--out", type=Path, help="the file to write (default: STATE_DIR/policies/NAME.policy)")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    head = learning_heads(settings)[HEAD]
    logs = read_logs(args.export, len(head.actions), len(FEATURES), args.since, args.until)
    if not logs.searches:
        raise ValueError(f"no usable rewarded searches in {args.export} "
                         f"(skipped: {dict(logs.skipped) or 'none found'})")
    name = args.name or f"candidate-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    trained_on = {"export": str(args.export.resolve()), "skipped": dict(logs.skipped),
                  "since": args.since and args.since.isoformat(), "until": args.until and args.until.isoformat(),
                  "first": logs.first_served, "last": logs.last_served}
    candidate = fit(name, HEAD, logs.searches, head.actions, FEATURES, head.default_action, settings.learning.core,
                    settings.learning.batch_size, trained_on, head.gate_groups)
    out = args.out or settings.state_dir / "policies" / f"{name}.policy"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode(candidate))
    snapshot = candidate.value_model(settings.learning.core, head.default_action, head.gate_groups).snapshot()
    return {"candidate": name, "path": str(out), "searches": len(logs.searches), "skipped": dict(logs.skipped),
            "gates_open": [head.actions[a] for a in snapshot.open_actions],
            "pooled_choice": head.actions[snapshot.pooled_action()]}


if __name__ == "__main__":
    sys.exit(main("train", __doc__, add_arguments, run))
