"""What `dtrag train` prints and saves: score tables, per-state choices, and the JSON record."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from cluster.clients.train import TrainingReport
from cluster.core.vocabulary import STRATEGIES
from learners.policy_scores import greedy_actions, oracle_actions


def report_json(report: TrainingReport) -> dict[str, Any]:
    test = report.test
    return {
        "dataset": report.dataset,
        "split": report.split,
        "started_from": report.started_from,
        "epochs": [dataclasses.asdict(e) for e in report.epochs],
        "scores": dataclasses.asdict(report.scores),
        "curve": report.curve(),
        "tau": report.final.tau,
        "q_table": report.final.q,
        "pooled": report.final.pooled,
        "test": {qid: {"state": state, "ndcg@10": dict(zip(STRATEGIES, row.tolist(), strict=True))}
                 for qid, state, row in zip(test.query_ids, test.states, test.scores, strict=True)},
    }


def format_scores(report: TrainingReport) -> str:
    """The policy table, then the gaps to the best fixed strategy and to the oracle."""
    s = report.scores
    rows = [(f"fixed: {name}", value) for name, value in s.fixed.items()]
    rows += [
        ("learned, greedy (argmax Q; an unseen state takes the pooled row)", s.greedy),
        (f"learned, as served (expected under softmax(Q/tau), tau {report.final.tau:g})", s.served),
        ("oracle per state (best strategy per state key on the test queries)", s.oracle),
    ]
    lines = ["| policy | nDCG@10 |", "|---|---:|"] + [f"| {name} | {value:.4f} |" for name, value in rows]
    best = s.best_fixed
    lines += [
        "",
        f"learned (greedy) - best fixed ({best}): {s.greedy - s.fixed[best]:+.4f}",
        f"oracle - learned (greedy): {s.oracle - s.greedy:+.4f}",
    ]
    return "\n".join(lines)


def format_states(report: TrainingReport) -> str:
    """Per state key: test queries, each strategy's mean nDCG@10, the learned and oracle choice."""
    test, q = report.test, report.final.q
    greedy = greedy_actions(test.states, q, report.final.pooled)
    oracle = oracle_actions(test.scores, test.states)
    header = "| state | test queries | " + " | ".join(STRATEGIES) + " | learned | oracle |"
    lines = [header, "|---|---:|" + "---:|" * len(STRATEGIES) + "---|---|"]
    by_state = collections.Counter(test.states)
    for state, count in by_state.most_common():
        i = test.states.index(state)
        mask = np.array([s == state for s in test.states])
        means = " | ".join(f"{v:.3f}" for v in test.scores[mask].mean(axis=0))
        learned = STRATEGIES[greedy[i]] + ("" if state in q else " (unseen)")
        lines.append(f"| `{state}` | {count} | {means} | {learned} | {STRATEGIES[oracle[i]]} |")
    return "\n".join(lines)


def format_report(report: TrainingReport) -> str:
    epochs = [
        f"epoch {i}: {e.feedbacks} feedbacks, mean reward {e.mean_reward:.4f}, served "
        + ", ".join(f"{s} {e.strategies.get(s, 0)}" for s in STRATEGIES)
        + f"; policy version {e.learning['policy_version']}, updates applied {e.learning['updates_applied']}"
        + ("" if e.caught_up else " (learning had not caught up)")
        for i, e in enumerate(report.epochs, start=1)
    ]
    return "\n".join([
        f"dataset {report.dataset}: {report.split}",
        *epochs,
        f"Q-table: {len(report.final.q)} states; test queries fall in {len(set(report.test.states))} states",
        "",
        format_scores(report),
        "",
        format_states(report),
    ])
