"""The answer composer the settings describe: which provider, which model, which limits."""

from __future__ import annotations

from cluster.platform.settings import Settings
from serve_app.answers.composer import AnswerComposer, AnswerLimits
from serve_app.answers.deadline import RetryPolicy
from serve_app.answers.providers import GeminiProvider, OpenAIProvider, Provider


def provider_from_settings(settings: Settings) -> Provider | None:
    """None for extractive answers (settings resolved `auto` and checked what each provider needs)."""
    if settings.answers.provider == "gemini":
        gemini = settings.gemini
        assert gemini.api_key
        return GeminiProvider(gemini.api_key, gemini.model, gemini.base_url)
    if settings.answers.provider == "openai":
        openai = settings.openai
        assert openai.base_url and openai.model
        return OpenAIProvider(openai.base_url, openai.model, openai.api_key)
    return None


def composer_from_settings(settings: Settings) -> AnswerComposer:
    answers = settings.answers
    limits = AnswerLimits(
        default_mode=answers.default_mode,  # type: ignore[arg-type]  checked by the settings
        budget_s=answers.budget_s,
        passages=answers.passages,
        max_prompt_chars=answers.max_prompt_chars,
        max_output_tokens=answers.max_output_tokens,
        call_timeout_s=answers.call_timeout_s,
        retry=RetryPolicy(answers.attempts, answers.backoff_s, answers.max_backoff_s),
    )
    return AnswerComposer(provider_from_settings(settings), limits)
