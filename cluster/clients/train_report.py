"""What `dtrag train` prints and saves: policy tables with intervals, the checks, the JSON record.

Every figure is a mean over the test queries of all seeds, with a 95% paired bootstrap interval
that resamples queries (a query's rows across seeds together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from cluster.clients.train import SeedRun, TrainingReport
from learners.policy_scores import (
    Interval,
    PolicyOutcome,
    fixed,
    greedy,
    outcome,
    paired_bootstrap,
    queries_needed,
    served,
)

NO_REGRET_AT, NO_REGRET_MARGIN = 200, 0.005
SERVED_AT, SERVED_MARGIN = 500, 0.003
CPU_SAVING = 0.25
Policy = Callable[[SeedRun], np.ndarray]  # a run -> probabilities (Q, A) on its test queries


def _always(action: int) -> Policy:
    return lambda run: fixed(run.test, action)


def _greedy_at(judged: int) -> Policy:
    return lambda run: greedy(run.test, run.snapshot_at(judged).policy)


def _served_at(judged: int) -> Policy:
    return lambda run: served(run.test, run.snapshot_at(judged).policy)


def _policies(report: TrainingReport, judged: int) -> dict[str, Policy]:
    policies = {f"fixed: {name}": _always(a) for a, name in enumerate(report.actions)}
    policies["learned, greedy"] = _greedy_at(judged)
    policies["learned, as served"] = _served_at(judged)
    return policies


def _pooled(report: TrainingReport, policy: Policy) -> tuple[PolicyOutcome, list[str]]:
    """The policy's per-query outcome over every seed's test queries, and each row's query id."""
    outcomes = [outcome(run.test, policy(run), report.cost_weight) for run in report.runs]
    fields = {f.name: np.concatenate([getattr(o, f.name) for o in outcomes]) for f in dataclasses.fields(PolicyOutcome)}
    return PolicyOutcome(**fields), [q for run in report.runs for q in run.test.query_ids]


def _difference(report: TrainingReport, a: Policy, b: Policy, metric: str) -> tuple[Interval, float]:
    """Paired interval of metric(a) - metric(b), and the queries a difference that size needs."""
    (left, queries), (right, _) = _pooled(report, a), _pooled(report, b)
    differences = getattr(left, metric) - getattr(right, metric)
    return paired_bootstrap(differences, queries), queries_needed(differences)


def _best_fixed(judged: int, by_reward: bool) -> Policy:
    """Per seed, the fixed action with the best training mean over the first `judged` queries."""
    return lambda run: fixed(run.test, run.best_fixed(run.snapshot_at(judged).judged, by_reward))


def policy_table(report: TrainingReport, judged: int) -> list[dict[str, Any]]:
    rows = []
    for name, policy in _policies(report, judged).items():
        pooled, queries = _pooled(report, policy)
        rows.append({"policy": name, **{metric: paired_bootstrap(getattr(pooled, metric), queries)
                                        for metric in ("quality", "cost", "dense", "reward")}})
    return rows


def checks(report: TrainingReport) -> list[dict[str, Any]]:
    """The issue's checks on this collection, each with its interval and verdict."""
    learned_greedy = _greedy_at(report.final_judged)
    results = []
    regret, need = _difference(report, _served_at(NO_REGRET_AT), _best_fixed(NO_REGRET_AT, False), "quality")
    results.append({"check": f"no regret: served - best fixed nDCG@10 after {NO_REGRET_AT} judged, one-sided "
                    f"lower bound >= -{NO_REGRET_MARGIN}", "interval": regret, "queries_needed": need,
                    "passed": bool(regret.lower_95 >= -NO_REGRET_MARGIN)})
    for a, name in enumerate(report.actions):
        gain, need = _difference(report, learned_greedy, _always(a), "reward")
        results.append({"check": f"strict gain: learned - {name} reward, 95% interval above 0",
                        "interval": gain, "queries_needed": need, "passed": bool(gain.low > 0)})
    default = report.runs[0].snapshots[0].policy.default_action
    (learned, _), (always, _) = _pooled(report, learned_greedy), _pooled(report, _always(default))
    saving = 1 - learned.cost.mean() / always.cost.mean()
    results.append({"check": f"CPU of the controlled stages at least {CPU_SAVING:.0%} below "
                    f"{report.actions[default]}", "saving": float(saving), "passed": bool(saving >= CPU_SAVING)})
    gap, need = _difference(report, _served_at(SERVED_AT), _greedy_at(SERVED_AT), "quality")
    results.append({"check": f"served within {SERVED_MARGIN} nDCG@10 of greedy after {SERVED_AT} judged",
                    "interval": gap, "queries_needed": need,
                    "passed": bool(gap.low >= -SERVED_MARGIN and gap.high <= SERVED_MARGIN)})
    return results


def format_report(report: TrainingReport) -> str:
    final = report.final_judged
    lines = [f"dataset {report.dataset}: {len(report.runs)} seeds, {final} judged queries each; "
             f"reward = nDCG@10 - {report.cost_weight:g} x CPU ms",
             *(f"seed {run.seed}: {run.split}; served {dict(run.served)}"
               + (f"; skipped {dict(run.skipped)}" if run.skipped else "")
               + (f"; {run.trimmed} judgements trimmed to the API limit" if run.trimmed else "")
               + f"; gates open: {', '.join(report.actions[a] for a in run.snapshots[-1].policy.open_actions) or 'none'}"
               for run in report.runs),
             "", f"After {final} judged queries (test queries, mean [95% paired bootstrap interval]):", "",
             "| policy | nDCG@10 | CPU ms | dense share | reward |", "|---|---:|---:|---:|---:|"]
    for row in policy_table(report, final):
        cells = [f"{row[m].mean:.4f} [{row[m].low:.4f}, {row[m].high:.4f}]" for m in ("quality", "cost", "dense")]
        cells[1] = f"{row['cost'].mean:.1f} [{row['cost'].low:.1f}, {row['cost'].high:.1f}]"
        cells.append(f"{row['reward'].mean:.4f} [{row['reward'].low:.4f}, {row['reward'].high:.4f}]")
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "Checks:", ""]
    for result in checks(report):
        detail = (f"{result['interval']}, a difference this size needs ~{result['queries_needed']:.0f} queries"
                  if "interval" in result else f"saving {result['saving']:.1%}")
        lines.append(f"- [{'pass' if result['passed'] else 'FAIL'}] {result['check']}: {detail}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, Interval):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def report_json(report: TrainingReport) -> dict[str, Any]:
    return {
        "dataset": report.dataset,
        "actions": report.actions,
        "cost_weight": report.cost_weight,
        "judged": report.final_judged,
        "policies": _plain(policy_table(report, report.final_judged)),
        "checks": _plain(checks(report)),
        "seeds": [{
            "seed": run.seed, "split": run.split, "served": dict(run.served), "skipped": dict(run.skipped),
            "trimmed": run.trimmed, "snapshots": [{"judged": s.judged, "model": s.report} for s in run.snapshots],
            "test": {qid: {"quality": dict(zip(report.actions, q.tolist(), strict=True)),
                           "cpu_ms": dict(zip(report.actions, c.tolist(), strict=True)),
                           "context": x.tolist()}
                     for qid, q, c, x in zip(run.test.query_ids, run.test.quality, run.test.cost, run.test.contexts,
                                             strict=True)},
        } for run in report.runs],
    }
