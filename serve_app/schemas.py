"""Request and response bodies of the HTTP API.

Requests are strict (no type coercion, unknown fields rejected) so a misspelt or mistyped field
is a 422 that names it rather than a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.core.vocabulary import Arm, FeatureFlags, Strategy

MAX_QUERY_CHARS = 1000

# Enums take their JSON value (strictness would demand a Python enum member); nothing else.
StrategyName = Annotated[Strategy, Field(strict=False)]
ArmName = Annotated[Arm, Field(strict=False)]


class _StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    q: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="The query text.")
    strategy: StrategyName | None = Field(
        None, description="Retrieval strategy; omitted, the arm's policy or default decides."
    )

    @field_validator("q")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain a non-space character")
        return value.strip()


class SearchRequest(_StrictRequest):
    final_topk: int = Field(5, ge=1, le=50, description="How many hits to return (1..50).")


class RankRequest(_StrictRequest):
    depth: int = Field(100, ge=1, le=1000, description="How many ranked ids to return (1..1000).")


class Hit(BaseModel):
    doc_id: str
    title: str
    snippet: str
    score: float
    rank: int


class AnswerBody(BaseModel):
    text: str
    citations: list[str]
    mode: Literal["extractive", "generative", "debate"]


class SearchResponse(BaseModel):
    search_id: str
    query: str
    hits: list[Hit]
    answer: AnswerBody
    strategy: Strategy
    arm: str
    config_version: int = Field(description="Version of the live flags and weights the arm used.")
    latency_ms: float


class RankedId(BaseModel):
    doc_id: str
    score: float


class RankResponse(BaseModel):
    query: str
    strategy: Strategy
    state_key: str
    ranking: list[RankedId]
    arm: str
    latency_ms: float


Grade = Annotated[int, Field(ge=0, le=4)]
DocId = Annotated[str, Field(min_length=1, max_length=512)]


class FeedbackRequest(BaseModel):
    """Exactly one of graded `judgements` or `clicks` (which count as grade 1 each)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    search_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="From the search response.")
    judgements: dict[DocId, Grade] | None = Field(
        None, min_length=1, max_length=1000,
        description="Graded relevance per doc id, 0 (not relevant) to 4.",
    )
    clicks: list[DocId] | None = Field(
        None, max_length=50, description="Doc ids the user clicked; [] for none."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        if (self.judgements is None) == (self.clicks is None):
            raise ValueError("give exactly one of 'judgements' or 'clicks'")
        return self


class FeedbackResponse(BaseModel):
    search_id: str
    reward: float = Field(description="nDCG of the served list under this feedback, in [0, 1].")
    strategy_rewards: dict[Strategy, float] | None = Field(
        None, description="For graded judgements: the reward of the list each strategy would have "
        "served for this search (all of them teach the policy). None for clicks.")
    duplicate: bool = Field(description="True when feedback for this search was already recorded.")


class ErrorBody(BaseModel):
    error: str
    message: str


class _Operation(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FlagsUpdate(_Operation):
    arm: ArmName = Arm.TREATMENT
    flags: dict[str, bool] = Field(min_length=1, description="Flag name to on (true) or off (false).")

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, flags: dict[str, bool]) -> dict[str, bool]:
        FeatureFlags.from_mapping(flags)  # the vocabulary's one check and message
        return flags


class WeightUpdate(_Operation):
    treatment_weight: float = Field(ge=0.0, le=1.0, description="Share of callers on the treatment.")


class RollbackRequest(_Operation):
    reason: str = Field("rolled back by operator", min_length=1, max_length=500)


class FaultUpdate(_Operation):
    arm: ArmName = Arm.TREATMENT
    failing: bool
