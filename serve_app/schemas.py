"""Request and response bodies of the HTTP API.

Requests are strict (no type coercion, unknown fields rejected) so a misspelt or mistyped field
is a 422 that names it rather than a silent default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Strategy = Literal["lexical", "dense", "hybrid_rrf", "hybrid_weighted"]
MAX_QUERY_CHARS = 1000


class _StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    q: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, description="The query text.")
    strategy: Strategy | None = Field(
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
    latency_ms: float


class RankedId(BaseModel):
    doc_id: str
    score: float


class RankResponse(BaseModel):
    query: str
    strategy: Strategy
    ranking: list[RankedId]
    arm: str
    latency_ms: float


class ErrorBody(BaseModel):
    error: str
    message: str
