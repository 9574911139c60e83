"""Request and response bodies of the HTTP API.

Requests are strict (no type coercion, unknown fields rejected) so a misspelt or mistyped field
is a 422 that names it rather than a silent default. Every string a caller sends is `Text` or
`Identifier`, so control characters stop here rather than in PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.core.vocabulary import Arm, FeatureFlags, Strategy

MAX_QUERY_CHARS = 1000

# C0, DEL and C1 controls, and unpaired surrogates (which no encoder accepts); text keeps tab and newline.
_DEL_C1_SURROGATES = r"\x7f-\x9f\ud800-\udfff"
CONTROL_CHARACTERS = re.compile(rf"[\x00-\x1f{_DEL_C1_SURROGATES}]")
_TEXT_CONTROL_CHARACTERS = re.compile(rf"[\x00-\x08\x0b-\x1f{_DEL_C1_SURROGATES}]")


def _forbidding(characters: re.Pattern[str]) -> AfterValidator:
    def check(value: str) -> str:
        if found := characters.search(value):
            raise ValueError(f"must not contain control characters or unpaired surrogates "
                             f"(U+{ord(found[0]):04X} at position {found.start()})")
        return value

    return AfterValidator(check)


# Free text (queries, reasons) may hold tabs and newlines; ids, keys and header values nothing.
Text = Annotated[str, _forbidding(_TEXT_CONTROL_CHARACTERS)]
Identifier = Annotated[str, _forbidding(CONTROL_CHARACTERS)]

# Enums take their JSON value (strictness would demand a Python enum member); nothing else.
StrategyName = Annotated[Strategy, Field(strict=False)]
ArmName = Annotated[Arm, Field(strict=False)]


class _StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    q: Text = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="The query text.")
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
    answer_mode: Literal["extractive", "generated", "debate", "auto"] | None = Field(
        None, description="How to answer: quote passages (extractive), write with the configured model "
        "(generated), two stances then a synthesis (debate), or let the service choose (auto). Omitted: "
        "the configured default.")
    stream: bool = Field(False, description="Answer as Server-Sent Events: `hits`, then `delta` events with "
                         "answer text, then `answer` with citations, usage and fallback.")
    debug: bool = Field(False, description="Include a debate's drafts in the answer.")


class RankRequest(_StrictRequest):
    depth: int = Field(100, ge=1, le=1000, description="How many ranked ids to return (1..1000).")
    every_action: bool = Field(False, description="Also rank under every action of the learning policy, "
                               "with each one's cost (for offline scoring of policies).")


class Hit(BaseModel):
    doc_id: str
    title: str
    snippet: str
    score: float
    rank: int


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class Draft(BaseModel):
    stance: Literal["supporting", "critical"]
    text: str
    citations: list[str]


Fallback = Literal["no_provider", "timeout", "provider_error", "budget", "refused"]


class AnswerBody(BaseModel):
    text: str = Field(description="The answer; each claim cites a hit as [doc_id].")
    citations: list[str] = Field(description="Doc ids the answer cites, all among the retrieved documents.")
    mode: Literal["extractive", "generated", "debate"]
    provider: str | None = Field(description="gemini or openai; null for an extractive answer.")
    model: str | None
    usage: Usage | None = Field(description="Tokens in and out, over every provider call of this answer.")
    latency_ms: float = Field(description="Time spent composing the answer.")
    fallback: Fallback | None = Field(
        description="Why the answer is not what was asked for: no provider configured, a call timed out, "
        "the provider failed, the request's budget ran out, or the model declined. Null when it is.")
    dropped_citations: int = Field(0, description="Citations of passages the model was not given, removed.")
    drafts: list[Draft] | None = Field(None, description="A debate's drafts, with `debug`.")


class SearchHits(BaseModel):
    """A search before its answer: the first event of a streamed search."""

    search_id: str
    query: str
    hits: list[Hit]
    strategy: str = Field(description="The fixed strategy asked for, or the policy action served (e.g. "
                          "`lexical`, `hybrid@0.5`, `hybrid@0.5+prf`).")
    arm: str
    config_version: int = Field(description="Version of the live flags and weights the arm used.")
    policy_version: int = Field(description="Version of the learned policy the arm held (0: none yet); it chose "
                                "the strategy when `soft_q_bandit` is on and no strategy was asked for.")


class SearchResponse(SearchHits):
    answer: AnswerBody
    latency_ms: float


class RankedId(BaseModel):
    doc_id: str
    score: float


class ActionRanking(BaseModel):
    name: str
    doc_ids: list[str]
    cpu_ms: float = Field(description="CPU of the stages the action runs after the lexical one, fusion included.")
    wall_ms: float


class RankResponse(BaseModel):
    query: str
    strategy: str
    state_key: str
    context: list[float] = Field(description="The policy's context features (`learners.context.FEATURES`).")
    ranking: list[RankedId]
    cost_cpu_ms: float = Field(description="CPU of the served action's stages after the lexical one.")
    actions: list[ActionRanking] | None = None
    arm: str
    latency_ms: float


Grade = Annotated[int, Field(ge=0, le=4)]
DocId = Annotated[Identifier, Field(min_length=1, max_length=512)]


AnswerGrade = Annotated[int, Field(ge=0, le=4)]


class FeedbackRequest(BaseModel):
    """Graded `judgements` or `clicks` (grade 1 each) of the documents, and/or a rating of the answer."""

    model_config = ConfigDict(strict=True, extra="forbid")

    search_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="From the search response.")
    judgements: dict[DocId, Grade] | None = Field(
        None, min_length=1, max_length=1000,
        description="Graded relevance per doc id, 0 (not relevant) to 4.",
    )
    clicks: list[DocId] | None = Field(
        None, max_length=50, description="Doc ids the user clicked; [] for none."
    )
    answer_rating: bool | AnswerGrade | None = Field(
        None, description="The answer itself: helpful (true) or not (false), or a grade 0..4.")

    @model_validator(mode="after")
    def _documents_or_answer(self) -> FeedbackRequest:
        if self.judgements is not None and self.clicks is not None:
            raise ValueError("give 'judgements' or 'clicks', not both")
        if self.judgements is None and self.clicks is None and self.answer_rating is None:
            raise ValueError("give 'judgements', 'clicks' or 'answer_rating'")
        return self

    def answer_score(self) -> float | None:
        """The rating on [0, 1]: helpful 1, not 0; a grade g is g / 4."""
        if self.answer_rating is None:
            return None
        return float(self.answer_rating) if isinstance(self.answer_rating, bool) else self.answer_rating / 4


class FeedbackResponse(BaseModel):
    search_id: str
    reward: float | None = Field(description="nDCG of the served list under the document feedback, in "
                                 "[0, 1]; null while only the answer was rated.")
    cost_cpu_ms: float | None = Field(None, description="CPU the served action's stages took.")
    action_quality: dict[str, float] | None = Field(
        None, description="For graded judgements: nDCG of the list each policy action serves for this query.")
    action_rewards: dict[str, float] | None = Field(
        None, description="For graded judgements: each policy action's reward, nDCG of its list minus "
        "cost_weight times its CPU ms (all of them teach the policy). None for clicks.")
    answer_rating: float | None = Field(None, description="The answer's rating on [0, 1] (helpful 1, a "
                                        "grade g as g / 4), as recorded; null while unrated.")
    duplicate: bool = Field(description="True when every part of this feedback was already recorded (the "
                            "first feedback for each part is kept).")


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ErrorBody(BaseModel):
    error: str = Field(description="A stable code, e.g. `invalid_request`, `unauthorized`, `service_unavailable`.")
    message: str = Field(description="What is wrong and what to do; never internal detail.")
    request_id: str = Field(description="Also in the `X-Request-Id` header and in the server's log line for "
                            "this request.")
    errors: list[FieldError] | None = Field(None, description="For 422: each bad field.")


class _Operation(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FlagsUpdate(_Operation):
    arm: ArmName = Arm.TREATMENT
    flags: dict[Identifier, bool] = Field(min_length=1, description="Flag name to on (true) or off (false).")

    @field_validator("flags")
    @classmethod
    def _known_flags(cls, flags: dict[str, bool]) -> dict[str, bool]:
        FeatureFlags.from_mapping(flags)  # the vocabulary's one check and message
        return flags


class WeightUpdate(_Operation):
    treatment_weight: float = Field(ge=0.0, le=1.0, description="Share of callers on the treatment.")


class RollbackRequest(_Operation):
    reason: Text = Field("rolled back by operator", min_length=1, max_length=500)


class FaultUpdate(_Operation):
    arm: ArmName = Arm.TREATMENT
    failing: bool
