"""`dtrag train`'s picture: cost against quality, the fixed actions as points and the learned
policy's trajectory through training, beside its reward learning curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.clients.train import TrainingReport
from learners.policy_scores import fixed, greedy, outcome


def _trajectory(report: TrainingReport) -> list[tuple[int, float, float, float]]:
    """(judged, CPU ms, nDCG@10, reward) of the greedy policy at each snapshot, averaged over seeds."""
    points = []
    for step in range(min(len(run.snapshots) for run in report.runs)):
        outcomes = [outcome(run.test, greedy(run.test, run.snapshots[step].policy), report.cost_weight)
                    for run in report.runs]
        points.append((int(np.mean([run.snapshots[step].judged for run in report.runs])),
                       float(np.mean([o.cost.mean() for o in outcomes])),
                       float(np.mean([o.quality.mean() for o in outcomes])),
                       float(np.mean([o.reward.mean() for o in outcomes]))))
    return points


def plot_cost_quality(report: TrainingReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    fixed_rewards = {}
    for a, name in enumerate(report.actions):
        outcomes = [outcome(run.test, fixed(run.test, a), report.cost_weight) for run in report.runs]
        cost = np.mean([o.cost.mean() for o in outcomes])
        quality = np.mean([o.quality.mean() for o in outcomes])
        fixed_rewards[name] = np.mean([o.reward.mean() for o in outcomes])
        left.scatter(cost, quality, color="tab:gray")
        left.annotate(name, (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    trajectory = _trajectory(report)
    judged, cost, quality, reward = zip(*trajectory, strict=True)
    left.plot(cost, quality, marker="o", markersize=3, color="tab:blue", label="learned policy (greedy), by judged queries")
    left.annotate(f"{judged[-1]} judged", (cost[-1], quality[-1]), textcoords="offset points", xytext=(4, -10),
                  fontsize=8, color="tab:blue")
    left.set_xlabel("CPU ms per search (stages after the lexical one)")
    left.set_ylabel("test nDCG@10")
    left.set_title(f"{report.dataset}: cost and quality ({len(report.runs)} seeds)")
    left.legend(loc="lower right", fontsize=8)
    right.plot(judged, reward, marker="o", markersize=3, label="learned policy (greedy)")
    best = max(fixed_rewards, key=fixed_rewards.__getitem__)
    right.axhline(fixed_rewards[best], color="tab:gray", linestyle="--", label=f"best fixed ({best})")
    right.set_xlabel("judged queries")
    right.set_ylabel(f"test reward (nDCG@10 - {report.cost_weight:g} x CPU ms)")
    right.set_title("learning curve")
    right.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
