"""Off-policy evaluation on exported logs: what other policies would have earned on the same searches.

    python -m cluster.jobs.ope EXPORT_DIR --candidate FILE [--candidate FILE ...] [--fixed lexical]
                               [--since 2026-11-20] [--out DIR]
    dtrag jobs submit ope EXPORT_DIR --candidate policies/candidate.policy --since 2026-11-20

Every served search logs the probability its policy gave the served action (its propensity), so
a target policy pi is evaluated by reweighting the logged rewards (`learners.off_policy`):
inverse propensity scoring (IPS), its self-normalised form (SNIPS) and doubly robust (DR, with a
cross-fitted reward model), each with a 95% bootstrap interval over searches and its effective
sample size (how many on-policy searches the estimate is worth: small means the target strays far
from what was logged, and the interval is wide). Targets: candidate files
(`python -m cluster.jobs.train`), with the service's margin, temperature and exploration, and
fixed actions (`--fixed NAME`, always that action). The logging policy's own value (the mean
reward it earned) is the baseline each is compared with.

Rewards as the service defines them (quality - cost weight x expected CPU ms; `cluster.jobs.logs`).
Rows without feedback, a context or a usable propensity (missing or zero) cannot be reweighted:
they are refused and counted in the summary, never guessed.

Writes into `--out` (default `STATE_DIR/jobs/ope-TIME`): estimates.parquet (target, estimator,
value, low, high, effective_sample_size, rows, refused) and table.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cluster.actors.start import learning_heads
from cluster.jobs.common import day, main
from cluster.jobs.logs import read_logs
from cluster.platform.settings import Settings
from learners.candidate import decode
from learners.context import FEATURES
from learners.off_policy import Estimate, LoggedSearches, bootstrap_rows, cross_fitted_rewards, estimate, evaluate

HEAD = "retrieval"
LOGGED = "logged policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", type=Path, help="an export folder (python -m cluster.jobs.export)")
    parser.add_argument("--candidate", type=Path, action="append", default=[], help="a candidate policy file")
    parser.add_argument("--fixed", action="append", default=[], metavar="ACTION",
                        help="always this retrieval action, e.g. lexical or hybrid@0.5")
    parser.add_argument("--since", type=day, help="evaluate on searches served from this UTC date (YYYY-MM-DD)")
    parser.add_argument("--until", type=day, help="... and before this one")
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    parser.add_argument("--out", type=Path, help="output folder (default: STATE_DIR/jobs/ope-TIME)")


def targets(args: argparse.Namespace, settings: Settings, contexts: np.ndarray) -> dict[str, np.ndarray]:
    """pi(.|x) of every target on the logged contexts, by name; (n, A) each."""
    head = learning_heads(settings)[HEAD]
    policies: dict[str, np.ndarray] = {}
    for path in args.candidate:
        candidate = decode(path.read_bytes())
        candidate.check_fits(HEAD, head.actions, FEATURES)
        model = candidate.value_model(settings.learning.core, head.default_action, head.gate_groups).snapshot()
        policies[candidate.name] = model.probabilities(contexts)
    for action in args.fixed:
        if action not in head.actions:
            raise ValueError(f"--fixed {action}: not one of the service's actions {list(head.actions)}")
        policies[f"always {action}"] = np.eye(len(head.actions))[np.full(len(contexts), head.actions.index(action))]
    if not policies:
        raise ValueError("nothing to evaluate: give --candidate FILE or --fixed ACTION")
    return policies


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import pandas as pd

    head = learning_heads(settings)[HEAD]
    logs = read_logs(args.export, len(head.actions), len(FEATURES), args.since, args.until)
    logged = logs.logged(settings.learning.core.cost_weight, len(head.actions))
    if len(logged) == 0:
        raise ValueError(f"no usable logged searches in {args.export} (refused: {dict(logs.skipped) or 'none found'})")
    policies = targets(args, settings, logged.contexts)
    q = cross_fitted_rewards(logged, len(head.actions))
    estimates = {LOGGED: [_logged_value(logged, args.seed)]}
    for name, pi in policies.items():
        estimates[name] = list(evaluate(logged, pi, q, seed=args.seed).values())
    out = args.out or settings.state_dir / "jobs" / f"ope-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([{"target": name, **vars(e)} for name, found in estimates.items() for e in found])
    table.to_parquet(out / "estimates.parquet", index=False)
    table_md = _markdown(estimates, logs.skipped, logged)
    (out / "table.md").write_text(table_md)
    print(table_md, file=sys.stderr)
    return {"rows": len(logged), "refused": sum(logs.skipped.values()), "refused_by_reason": dict(logs.skipped),
            "estimates": {name: {e.estimator: [round(e.value, 5), round(e.low, 5), round(e.high, 5),
                                               round(e.effective_sample_size, 1)] for e in found}
                          for name, found in estimates.items()},
            "out": str(out)}


def _logged_value(logs: LoggedSearches, seed: int, resamples: int = 2000) -> Estimate:
    """The mean reward the logging policy earned, with a bootstrap interval (on-policy: every row counts)."""
    draws = bootstrap_rows(logs, resamples, seed)
    return estimate(logs, "on-policy", logs.rewards, draws, float(len(logs)))


def _markdown(estimates: dict[str, list[Estimate]], skipped: dict[str, int], logs: LoggedSearches) -> str:
    lines = [f"Off-policy estimates on {len(logs)} logged searches ({sum(skipped.values())} refused"
             + (f": {', '.join(f'{n} {why}' for why, n in skipped.items())}" if skipped else "") + ")", "",
             "| target | estimator | value | 95% interval | effective searches |", "|---|---|---|---|---|"]
    for name, found in estimates.items():
        for e in found:
            lines.append(f"| {name} | {e.estimator} | {e.value:.4f} | [{e.low:.4f}, {e.high:.4f}] | "
                         f"{e.effective_sample_size:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main("ope", __doc__, add_arguments, run))
