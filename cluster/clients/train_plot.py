"""The learning curve of `dtrag train` as a PNG."""

from __future__ import annotations

from pathlib import Path

from cluster.clients.train import TrainingReport


def plot_learning_curve(report: TrainingReport, path: Path) -> None:
    """Greedy test nDCG@10 against feedbacks, with the best fixed strategy and the oracle."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here
    import matplotlib.pyplot as plt

    x, y = zip(*report.curve(), strict=True)
    scores = report.scores
    best = scores.best_fixed
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(x, y, marker="o", markersize=3, label="learned policy (greedy)")
    axes.axhline(scores.fixed[best], color="tab:gray", linestyle="--", label=f"best fixed ({best})")
    axes.axhline(scores.oracle, color="tab:green", linestyle=":", label="oracle per state")
    for epoch in report.epochs[:-1]:
        axes.axvline(epoch.feedbacks, color="0.85", linewidth=0.8)
    axes.set_xlabel("feedbacks")
    axes.set_ylabel(f"test nDCG@10 ({len(report.test.query_ids)} queries)")
    axes.set_title(f"dtrag train: {report.dataset}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)  # off the curve
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
