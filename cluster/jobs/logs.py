"""Exported experiences (`cluster.jobs.export`) as what offline training and evaluation read.

A row teaches or is evaluated on only when it has a context of the service's feature count, a
served action among its actions, a propensity in (0, 1] and a measured quality (feedback came);
every other row is counted by reason and skipped, never fatal.

Reward, as the service defines it (`learners.learning_core`): r(a) = quality(a) - lambda x c(a),
with c(a) the action's expected CPU ms. The service keeps c(a) as a running mean of recent
measured costs; offline it is the mean of every measured cost of a in the logs read.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np

from learners.learning_core import RewardedSearch
from learners.off_policy import LoggedSearches

COLUMNS = ("created_at", "context", "action", "quality", "cost_cpu_ms", "propensity", "policy_version",
           "next_context", "action_quality", "action_costs", "action_probabilities")


@dataclasses.dataclass(frozen=True)
class Logs:
    """The usable rewarded searches, oldest first, and how many rows were skipped, by reason."""

    searches: list[RewardedSearch]
    skipped: collections.Counter[str]
    first_served: str | None  # ISO times of the oldest and newest usable search
    last_served: str | None

    def expected_costs(self, n_actions: int) -> np.ndarray:
        """c(a): the mean measured CPU ms of each action over the logs (served and, when graded, all); (A,)."""
        total, count = np.zeros(n_actions), np.zeros(n_actions)
        for search in self.searches:
            if search.action_costs is not None:
                total += np.asarray(search.action_costs, np.float64)
                count += 1
            else:
                total[search.action] += search.cost
                count[search.action] += 1
        return np.divide(total, count, out=np.zeros(n_actions), where=count > 0)

    def logged(self, cost_weight: float, n_actions: int) -> LoggedSearches:
        """The served action of each search with its propensity and reward (what OPE reweights)."""
        costs = self.expected_costs(n_actions)
        actions = np.array([s.action for s in self.searches], np.int64)
        rewards = np.array([s.quality for s in self.searches], np.float64) - cost_weight * costs[actions]
        n_features = len(self.searches[0].context) if self.searches else 0
        contexts = np.array([s.context for s in self.searches], np.float64).reshape(len(self.searches), n_features)
        return LoggedSearches.usable(contexts, actions, [s.propensity for s in self.searches], rewards)


def read_logs(export: Path, n_actions: int, n_features: int, since: dt.datetime | None = None,
              until: dt.datetime | None = None) -> Logs:
    """The rewarded searches of an export created in [since, until), oldest first."""
    import pyarrow.dataset as ds

    if not export.is_dir():
        raise FileNotFoundError(f"{export}: no such export folder (write one with `python -m cluster.jobs.export`)")
    dataset = ds.dataset(export, format="parquet", partitioning="hive")
    missing = [column for column in COLUMNS if column not in dataset.schema.names]
    if missing:
        raise ValueError(f"{export} is not an export of experiences: it lacks the columns {missing}")
    window = None
    if since is not None:
        window = ds.field("created_at") >= since
    if until is not None:
        window = (ds.field("created_at") < until) if window is None else window & (ds.field("created_at") < until)
    rows = dataset.to_table(columns=list(COLUMNS), filter=window).sort_by("created_at").to_pylist()
    searches, skipped, served = [], collections.Counter[str](), []
    for row in rows:
        reason = _unusable(row, n_actions, n_features)
        if reason:
            skipped[reason] += 1
            continue
        served.append(row["created_at"])
        searches.append(RewardedSearch(
            context=row["context"], action=row["action"], quality=row["quality"], cost=row["cost_cpu_ms"] or 0.0,
            propensity=row["propensity"], policy_version=row["policy_version"], next_context=row["next_context"],
            action_quality=_full(row["action_quality"], n_actions), action_costs=_full(row["action_costs"], n_actions),
            action_probabilities=_full(row["action_probabilities"], n_actions)))
    return Logs(searches, skipped, served[0].isoformat() if served else None,
                served[-1].isoformat() if served else None)


def _unusable(row: dict, n_actions: int, n_features: int) -> str | None:
    """Why a row can neither teach nor be evaluated on; None when it can."""
    if row["quality"] is None or not np.isfinite(row["quality"]):
        return "no feedback"
    if row["context"] is None:
        return "no context"
    if len(row["context"]) != n_features:
        return f"a context of {len(row['context'])} features, not {n_features}"
    if row["action"] is None or not 0 <= row["action"] < n_actions:
        return "an action the service does not have"
    if row["propensity"] is None or not 0 < row["propensity"] <= 1:
        return "no usable propensity"
    return None


def _full(values: list[float] | None, n_actions: int) -> list[float] | None:
    """A per-action list, when it has every action (graded feedback); else None."""
    return values if values is not None and len(values) == n_actions else None
