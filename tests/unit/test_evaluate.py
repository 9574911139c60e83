import numpy as np

from cluster.clients.evaluate import StrategyResult, format_table


def result(name: str, ndcg: list[float]) -> StrategyResult:
    per_query = {f"q{i}": {"ndcg@10": v, "p@5": 0.0, "r@100": 0.0} for i, v in enumerate(ndcg)}
    return StrategyResult(name, len(ndcg), float(np.mean(ndcg)), 0.0, 0.0, per_query)


def test_the_table_pairs_every_strategy_with_the_best_and_says_how_many_queries_it_needs():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    best, close = result("best", list(base + 0.05)), result("close", list(base))
    lines = format_table([close, best]).splitlines()
    assert "- best [95% paired]" in lines[0]
    row = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    # the same per-query noise on both sides cancels in the paired difference: exactly -0.05
    assert "-0.0500 [-0.0500, -0.0500]" in row["close"]
    assert row["best"].endswith("|  |  |")  # no difference to itself
    low, high = (float(v) for v in row["best"].split("[")[1].split("]")[0].split(", "))
    assert low < best.ndcg_at_10 < high
