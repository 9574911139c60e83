"""Per search, what runs after the lexical stage and how the answer is written: asked for, the
policy's choice, or the default.

Plain functions over a context vector and a policy snapshot, so a replica decides without
waiting on anything: the policy is the copy the replica holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cluster.core.actions import RetrievalAction
from cluster.core.vocabulary import Strategy
from learners.learning_core import PolicySnapshot
from serve_app.answers.composer import AnswerMode


@dataclasses.dataclass(frozen=True)
class Decision:
    """What was chosen for one part of a search, and what the learning log needs about it."""

    action: RetrievalAction | None  # None: an original strategy asked for, or an answer mode
    name: str  # what was served: the action's, strategy's or answer mode's name
    index: int | None  # position in the policy's actions; None when it is not one of them
    probabilities: tuple[float, ...]  # pi(.|x) of the acting policy, in action order
    policy_version: int

    @property
    def propensity(self) -> float:
        return self.probabilities[self.index] if self.index is not None else 1.0


def decide(
    context: np.ndarray,
    requested: Strategy | None,
    default: Strategy,
    fusion_weight: float,
    actions: Sequence[RetrievalAction],
    policy: PolicySnapshot | None,
    use_policy: bool,
    rng: np.random.Generator,
) -> Decision:
    """A requested strategy wins; else a ~ pi(.|x) when the bandit is on; else the default.

    With the bandit on and no policy yet, the default strategy is served as the policy's action
    (a new model serves its default action until it has learned otherwise).
    """
    version = policy.version if policy else 0
    if use_policy and requested is None and policy is not None:
        probabilities = policy.model.probabilities(context)[0]
        index = int(rng.choice(len(probabilities), p=probabilities))
        return Decision(actions[index], actions[index].name, index, tuple(probabilities.tolist()), version)
    chosen = requested or default
    if chosen is not Strategy.HYBRID_COMPLETE:
        return Decision(None, chosen, None, (), version)
    action = RetrievalAction(fusion_weight)
    index = actions.index(action) if action in actions else None
    certain = tuple(float(i == index) for i in range(len(actions))) if index is not None else ()
    return Decision(action, action.name, index, certain, version)


def decide_answer(
    context: np.ndarray,
    rule: AnswerMode,
    auto: bool,
    modes: Sequence[str],
    debate_allowed: bool,
    policy: PolicySnapshot | None,
    use_policy: bool,
    rng: np.random.Generator,
) -> Decision:
    """A named mode is served as asked (not learned from). `auto` is the answer policy's choice among
    `modes` (debate only where the arm's debate_mode flag is on) when the bandit is on, else `rule`,
    the composer's own choice for `auto`, logged with propensity 1."""
    version = policy.version if policy else 0
    if not auto:
        return Decision(None, rule, None, (), version)
    if use_policy and policy is not None and len(modes) > 1:
        allowed = np.array([mode != "debate" or debate_allowed for mode in modes])
        probabilities = policy.model.probabilities(context, allowed)[0]
        index = int(rng.choice(len(probabilities), p=probabilities))
        return Decision(None, modes[index], index, tuple(probabilities.tolist()), version)
    index = modes.index(rule)
    return Decision(None, rule, index, tuple(float(i == index) for i in range(len(modes))), version)
