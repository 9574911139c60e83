"""Candidate policies: a value model fitted offline from logged searches, judged before users see it.

A data scientist fits a candidate from exported logs (`fit`), keeps it as a file (`encode`: the
`learners.checkpoint` format, never pickle) and promotes it into the running learning actor. The
actor judges it first (`judge`) on searches it logged itself: the doubly robust value of the
candidate and of the live policy on the same rows, and their paired difference

    d_i = DR_i(pi_candidate) - DR_i(pi_live),   refused when mean(d) < -margin

so the two share every row's noise and the interval of the difference is much narrower than either
estimate's. `fit` replays the logs the way the service learns from traffic: rewarded searches
arrive in batches, each scored by the gates before it is learned from, and learner updates follow
until the replay's samples-per-insert limit stops them. So a candidate is the model the live
service would have reached on the same feedback, gates and all, and promoting it only moves the
live model there sooner (or onto logs it never saw, such as another cluster's).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any


from learners import checkpoint as codec
from learners.learning_core import LearningConfig, LearningCore, RewardedSearch
from learners.off_policy import (
    Estimate,
    LoggedSearches,
    bootstrap_rows,
    cross_fitted_rewards,
    dr_terms,
    effective_sample_size,
    estimate,
    importance_weights,
)
from learners.value_model import ValueModel, ValueSnapshot, compute_deltas

KIND = "dtrag-candidate-policy"
FORMAT = 1  # bump when the fields below change


class CandidateError(ValueError):
    """Bytes that are not a candidate this service can serve (damaged, another head, actions or features)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A fitted value model and where it came from."""

    name: str
    head: str  # the learning head it is for: "retrieval"
    actions: tuple[str, ...]
    features: tuple[str, ...]
    model: Mapping[str, Any]  # ValueModel.state_dict()
    trained_on: Mapping[str, Any]  # rows used and refused, the logs' time span, the source
    created_at: str  # ISO 8601, UTC

    def value_model(self, config: LearningConfig, default_action: int,
                    gate_groups: Sequence[int] | None = None) -> ValueModel:
        """The candidate as a model under the live hyperparameters (margin, tau, exploration, gate groups)."""
        model = ValueModel(len(self.actions), len(self.features), prior_count=config.prior_count, lr=config.lr,
                           tau=config.tau, margin=config.margin, explore_max=config.explore_max,
                           default_action=default_action, bins=config.context_bins, gate_groups=gate_groups)
        try:
            model.load_state_dict(self.model)
        except (KeyError, TypeError, ValueError) as error:
            raise CandidateError(f"candidate {self.name!r} has an unusable model: {error}") from error
        return model

    def check_fits(self, head: str, actions: Sequence[str], features: Sequence[str]) -> None:
        """CandidateError unless the candidate was fitted for this head, these actions and features."""
        if self.head != head:
            raise CandidateError(f"candidate {self.name!r} is for the {self.head!r} head, not {head!r}")
        if list(self.actions) != list(actions) or list(self.features) != list(features):
            raise CandidateError(
                f"candidate {self.name!r} was fitted for actions {list(self.actions)} and features "
                f"{list(self.features)}; the service has {list(actions)} and {list(features)}: refit it on "
                "logs exported from this service")


def encode(candidate: Candidate) -> bytes:
    return codec.encode({"kind": KIND, "format": FORMAT, **dataclasses.asdict(candidate)})


def decode(blob: bytes) -> Candidate:
    """The candidate `encode` wrote; CandidateError for anything else."""
    try:
        tree = codec.decode(blob)
    except codec.CheckpointError as error:
        raise CandidateError(f"not a candidate policy file: {error}") from error
    if tree.get("kind") != KIND:
        raise CandidateError("not a candidate policy file (a checkpoint of something else)")
    if tree.get("format") != FORMAT:
        raise CandidateError(f"candidate file has format {tree.get('format')}, this code reads {FORMAT}")
    try:
        return Candidate(
            name=str(tree["name"]), head=str(tree["head"]), actions=tuple(tree["actions"]),
            features=tuple(tree["features"]), model=tree["model"], trained_on=dict(tree["trained_on"]),
            created_at=str(tree["created_at"]))
    except (KeyError, TypeError) as error:
        raise CandidateError(f"candidate file lacks a field: {error}") from error


def fit(name: str, head: str, searches: Sequence[RewardedSearch], actions: Sequence[str], features: Sequence[str],
        default_action: int, config: LearningConfig, batch_size: int,
        trained_on: Mapping[str, Any] | None = None, gate_groups: Sequence[int] | None = None) -> Candidate:
    """Learn from `searches` (oldest first) as the service would, in arrival batches of `batch_size`."""
    core = LearningCore(actions, features, default_action, config, gate_groups=gate_groups)
    for start in range(0, len(searches), batch_size):
        core.add_searches(searches[start:start + batch_size])
        while (batch := core.sample(batch_size)) is not None:
            delta, td = compute_deltas(batch.snapshot, batch.transitions, batch.weights, batch.gamma)
            core.apply_update(delta, batch.indices, batch.insertion_ids, td)
    return Candidate(name, head, tuple(actions), tuple(features), core.model.state_dict(),
                     {"searches": len(searches), **(trained_on or {})}, dt.datetime.now(dt.UTC).isoformat())



@dataclasses.dataclass(frozen=True)
class Judgement:
    """The candidate against the live policy on the same logged searches (doubly robust)."""

    candidate: Estimate
    live: Estimate
    difference: Estimate  # paired: candidate - live, row by row
    margin: float

    @property
    def worse(self) -> bool:
        """Worse than the live policy by more than the margin."""
        return self.difference.value < -self.margin

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": dataclasses.asdict(self.candidate), "live": dataclasses.asdict(self.live),
                "difference": dataclasses.asdict(self.difference), "margin": self.margin, "worse": self.worse}


def judge(logs: LoggedSearches, candidate: ValueSnapshot, live: ValueSnapshot, margin: float,
          resamples: int = 2000, seed: int = 0) -> Judgement:
    """Doubly robust values of both policies as served (with their exploration) and their paired difference."""
    if len(logs) == 0:
        raise ValueError(f"no usable logged searches to judge on ({logs.refused} refused)")
    q = cross_fitted_rewards(logs, candidate.n_actions)
    draws = bootstrap_rows(logs, resamples, seed)
    pi = {"candidate": candidate.probabilities(logs.contexts), "live": live.probabilities(logs.contexts)}
    terms = {name: dr_terms(logs, target, q) for name, target in pi.items()}
    ess = {name: effective_sample_size(importance_weights(logs, target)) for name, target in pi.items()}
    return Judgement(
        candidate=estimate(logs, "dr", terms["candidate"], draws, ess["candidate"]),
        live=estimate(logs, "dr", terms["live"], draws, ess["live"]),
        difference=estimate(logs, "dr difference", terms["candidate"] - terms["live"], draws,
                            min(ess.values())),
        margin=margin,
    )

