"""The service's vocabulary: retrieval strategies, arms, feature flags and API-key scopes.

Defined once, as typed values, and validated here with one message each, so a misspelt name
fails where it enters (settings, rollout plan, admin API, CLI) instead of reading as "off".
Pure Python: every layer may import it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping


class Strategy(enum.StrEnum):
    """A fixed retrieval strategy a caller can ask for.

    `hybrid_complete` (complete-score fusion at the configured weight) is the baseline and one of
    the policy's actions; the other four rank as they always did (lexical backfilled from dense,
    dense alone, and the two fusions that score a candidate missing from one list as 0 there).
    """

    LEXICAL = "lexical"
    DENSE = "dense"
    HYBRID_RRF = "hybrid_rrf"
    HYBRID_WEIGHTED = "hybrid_weighted"
    HYBRID_COMPLETE = "hybrid_complete"


STRATEGIES: tuple[Strategy, ...] = tuple(Strategy)


class Arm(enum.StrEnum):
    """A deployment of the pipeline that callers are routed to."""

    CONTROL = "control"
    TREATMENT = "treatment"


ARMS: tuple[Arm, ...] = tuple(Arm)


class Flag(enum.StrEnum):
    SOFT_Q_BANDIT = "soft_q_bandit"
    DEBATE_MODE = "debate_mode"
    EXPERIENCE_REPLAY = "experience_replay"
    META_PLANNER = "meta_planner"
    MCP_TOOLS = "mcp_tools"
    NEURAL_CASE_SELECTOR = "neural_case_selector"
    TOOLS_POLICY = "tools_policy"

    @property
    def behaviour(self) -> str | None:
        """What the flag does today; None: accepted and rolled out, but nothing behind it yet."""
        return _BEHAVIOUR.get(self)


_BEHAVIOUR = {
    Flag.SOFT_Q_BANDIT: "choose the retrieval action (dense or not, fusion weight, PRF) from the learned policy",
    Flag.EXPERIENCE_REPLAY: "log every served search as an experience for learning",
    Flag.DEBATE_MODE: "answer_mode auto debates: two drafts at once, then a cited synthesis",
}

NAME_USERS = "name_users"  # the key may name its users (`X-User-Id`), each then routed to an arm of its own
SCOPES = ("search", "admin", NAME_USERS)


def _parse(kind: type[enum.StrEnum], noun: str, plural: str, name: str) -> enum.StrEnum:
    try:
        return kind(name)
    except ValueError:
        raise ValueError(f"unknown {noun} '{name}'; {plural}: {', '.join(kind)}") from None


def parse_strategy(name: str) -> Strategy:
    return _parse(Strategy, "strategy", "strategies", name)  # type: ignore[return-value]


def parse_arm(name: str) -> Arm:
    return _parse(Arm, "arm", "arms", name)  # type: ignore[return-value]


def parse_flag(name: str) -> Flag:
    return _parse(Flag, "flag", "flags", name)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class FeatureFlags:
    """Which flags are on for one arm; behaviour reads attributes, so a typo is an error."""

    soft_q_bandit: bool = False
    debate_mode: bool = False
    experience_replay: bool = False
    meta_planner: bool = False
    mcp_tools: bool = False
    neural_case_selector: bool = False
    tools_policy: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, bool]) -> FeatureFlags:
        return cls().with_changes(values)

    def with_changes(self, changes: Mapping[str, bool]) -> FeatureFlags:
        """These flags with `changes` applied; ValueError names an unknown flag."""
        parsed = {parse_flag(name).value: bool(on) for name, on in changes.items()}
        return dataclasses.replace(self, **parsed)

    def is_on(self, flag: Flag) -> bool:
        return getattr(self, flag.value)

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)
