"""Settings: `configs/settings.yaml` defaults, overridden by an env file, overridden by the environment.

One frozen value object is built at start and handed to every deployment, so a replica never
reads the environment of the machine it happens to land on. Invalid values fail at start with
the name of the variable that holds them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cluster.core.rollout import RolloutPlan, parse_plan
from cluster.core.actions import RetrievalAction, retrieval_actions
from cluster.core.deployments import parse_deployments
from cluster.core.vocabulary import Flag, FeatureFlags, Strategy, parse_strategy
from cluster.platform.log import configure_logging
from learners.learning_core import LearningConfig

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class DatabaseSettings:
    url: str | None
    pool_size: int
    max_overflow: int
    command_timeout_s: float
    pool_timeout_s: float  # the longest a request waits for a pooled connection (then 503)


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    api_key_cache_s: float
    max_body_bytes: int
    max_candidate_bytes: int  # the promote route's body limit (a candidate policy file is ~100-300 KB)
    request_timeout_s: float  # a search or rank running longer is cancelled: 504
    rate_limit_per_s: float  # per API key and ingress replica; 0: no limit
    rate_limit_burst: int


@dataclasses.dataclass(frozen=True)
class RaySettings:
    address: str | None
    num_cpus: int | None
    metrics_port: int
    dashboard_port: int  # 0: no dashboard, so no job server


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    live_refresh_s: float
    treatment_replicas: int | None  # None: as configs/serve.yaml says for arm_treatment
    plan: RolloutPlan


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    default_strategy: Strategy
    candidates: int
    ef_search: int
    rrf_k: int
    fusion_weight: float
    fusion_grid: tuple[float, ...]  # the policy's fusion weights; fusion_weight is one of them
    bm25_k1: float
    bm25_b: float
    lexical_postings_per_term: int  # 0: exhaustive BM25

    @property
    def actions(self) -> tuple[RetrievalAction, ...]:
        """The policy's retrieval actions (`cluster.core.actions`)."""
        return retrieval_actions(self.fusion_grid)

    @property
    def default_action(self) -> int:
        """The action a policy serves until it learns better: complete-score fusion at fusion_weight."""
        return self.actions.index(RetrievalAction(self.fusion_weight))


@dataclasses.dataclass(frozen=True)
class EmbeddingSettings:
    batch_size: int
    max_batch_size: int


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    # A fixed count pins that deployment; None: as `deployments` says (autoscaled or fixed there).
    pipeline_replicas: int | None
    ingress_replicas: int | None
    embedder_replicas: int | None
    max_ongoing_requests: int
    health_check_period_s: float  # how often Serve calls each replica's `check_health`
    health_check_timeout_s: float  # a check slower than this counts as failed (the replica restarts)
    deployments: dict[str, dict[str, Any]]  # each deployment's replicas and resources (cluster.platform.serve_config)


@dataclasses.dataclass(frozen=True)
class LearningSettings:
    core: LearningConfig  # replay and value-model hyperparameters (the `learning.*` keys it names)
    batch_size: int
    learners: int
    replay_shards: int  # 1: the replay lives in the learning actor; N > 1: in N ReplayShard actors
    checkpoint_interval_s: float
    policy_refresh_s: float
    experience_queue: int
    experience_flush_s: float

    @classmethod
    def from_section(cls, values: Mapping[str, Any]) -> LearningSettings:
        core_names = {field.name for field in dataclasses.fields(LearningConfig)}
        return cls(core=LearningConfig(**{k: v for k, v in values.items() if k in core_names}),
                   **{k: v for k, v in values.items() if k not in core_names})


@dataclasses.dataclass(frozen=True)
class PromotionSettings:
    """How `dtrag policy promote` judges a candidate against the live policy (learners.candidate)."""

    margin: float  # refused when the candidate's estimated reward is lower than the live policy's by more
    judge_rows: int  # the newest rewarded searches the judgement is computed on
    min_rows: int  # fewer usable ones: no judgement, refused unless forced


@dataclasses.dataclass(frozen=True)
class RetentionSettings:
    """How long served searches stay in `experiences` (0 disables a limit); see cluster.data.retention."""

    max_age_days: float
    max_rows: int
    interval_s: float  # how often the learning actor prunes; 0: only `dtrag db prune`
    export_dir: str | None  # Parquet of the rows about to go, partitioned by date; None: not kept


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    provider: str  # extractive, gemini or openai (`auto` is resolved at load)
    default_mode: str  # auto, extractive, generated or debate
    budget_s: float  # one hard deadline per search, retrieval included
    call_timeout_s: float
    attempts: int
    backoff_s: float
    max_backoff_s: float
    passages: int
    max_prompt_chars: int
    max_output_tokens: int

    @property
    def modes(self) -> tuple[str, ...]:
        """The answer modes a policy may choose among: all three with a provider; without one,
        generated would only fall back to extractive, and debate is its extractive form."""
        return ("extractive", "debate") if self.provider == "extractive" else ("extractive", "generated", "debate")

    @property
    def default_learned_mode(self) -> str:
        """What the answer policy serves until it has learned otherwise: generated with a provider."""
        return "extractive" if self.provider == "extractive" else "generated"


@dataclasses.dataclass(frozen=True)
class GeminiSettings:
    api_key: str | None = dataclasses.field(repr=False)
    model: str
    base_url: str | None  # a server that speaks the Gemini REST API; None: Google's


@dataclasses.dataclass(frozen=True)
class OpenAISettings:
    base_url: str | None  # an OpenAI-compatible server, e.g. http://localhost:8000/v1
    model: str | None
    api_key: str | None = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    api_key: str | None  # what `dtrag eval`, `train`, `flags` and `rollout` send by default


@dataclasses.dataclass(frozen=True)
class Settings:
    environment: str
    log_level: str
    state_dir: Path
    database: DatabaseSettings
    http: HttpSettings
    ray: RaySettings
    retrieval: RetrievalSettings
    embedding: EmbeddingSettings
    serve: ServeSettings
    learning: LearningSettings
    retention: RetentionSettings
    promotion: PromotionSettings
    rollout: RolloutSettings
    client: ClientSettings
    features: FeatureFlags
    answers: AnswerSettings
    gemini: GeminiSettings
    openai: OpenAISettings

    def with_database_url(self, url: str) -> Settings:
        """The same settings pointing at a concrete database (used once the embedded one is up)."""
        return dataclasses.replace(self, database=dataclasses.replace(self.database, url=url))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "on", "yes"):
        return True
    if lowered in ("0", "false", "off", "no"):
        return False
    raise ValueError("expected one of on/off, true/false, 1/0, yes/no")


def _number(kind: Callable[[str], float], accept: Callable[[float], bool], rule: str) -> Callable[[str], Any]:
    """A parser of `kind` (int or float) that refuses values `accept` rejects; NaN fails every rule."""

    def parse(text: str) -> float:
        value = kind(text)
        if not accept(value):
            raise ValueError(f"must be {rule}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_positive_float = _number(float, lambda v: v > 0, "a number > 0")
_unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
_port = _number(int, lambda v: 1 <= v <= 65535, "a TCP port between 1 and 65535")
_port_or_off = _number(int, lambda v: 0 <= v <= 65535, "a TCP port between 1 and 65535, or 0 for off")
_bins = _number(int, lambda v: v == 0 or v >= 2, "0 (raw features) or a whole number >= 2")


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _weights(text: str) -> tuple[float, ...]:
    parts = [part.strip() for part in text.strip().strip("[]()").split(",") if part.strip()]
    values = tuple(_unit_float(part) for part in parts)
    if not values or len(set(values)) != len(values):
        raise ValueError("must be distinct numbers between 0 and 1, comma-separated")
    return values


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _config_file(text: str, shipped: str) -> str:
    """The text of the file at the path `text`, or of the shipped `configs/<shipped>` for null."""
    if text.strip() in ("", "null", "none"):
        return resources.files("configs").joinpath(shipped).read_text()
    path = Path(text.strip())
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    return path.read_text()


def _rollout_plan(text: str) -> RolloutPlan:
    """The rollout YAML at the path `text`, or the shipped `configs/rollout.yaml` for null."""
    try:
        return parse_plan(yaml.safe_load(_config_file(text, "rollout.yaml")))
    except (KeyError, TypeError, yaml.YAMLError) as error:
        raise ValueError(f"not a rollout plan: {error!r}") from None


def _serve_deployments(text: str) -> dict[str, dict[str, Any]]:
    """The deployment options of the Serve config at the path `text`, or of the shipped
    `configs/serve.yaml` for null."""
    try:
        return parse_deployments(yaml.safe_load(_config_file(text, "serve.yaml")))
    except yaml.YAMLError as error:
        raise ValueError(f"not YAML: {error}") from None


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.strip() in ("", "null", "none") else parse(text)

    return parse_optional


# (path in settings.yaml, environment variable, parser)
_FIELDS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("environment", "ENVIRONMENT", _text),
    ("log_level", "LOG_LEVEL", _choice(LOG_LEVELS, upper=True)),
    ("state_dir", "DTRAG_STATE_DIR", _text),
    ("database.url", "DATABASE_URL", _optional(_text)),
    ("database.pool_size", "DB_POOL_SIZE", _positive_int),
    ("database.max_overflow", "DB_MAX_OVERFLOW", _non_negative_int),
    ("database.command_timeout_s", "DTRAG_DB_COMMAND_TIMEOUT_S", _positive_float),
    ("database.pool_timeout_s", "DTRAG_DB_POOL_TIMEOUT_S", _positive_float),
    ("http.host", "DTRAG_HTTP_HOST", _text),
    ("http.port", "DTRAG_HTTP_PORT", _port),
    ("http.api_key_cache_s", "DTRAG_API_KEY_CACHE_S", _non_negative_float),
    ("http.max_body_bytes", "DTRAG_MAX_BODY_BYTES", _positive_int),
    ("http.max_candidate_bytes", "DTRAG_MAX_CANDIDATE_BYTES", _positive_int),
    ("http.request_timeout_s", "DTRAG_REQUEST_TIMEOUT_S", _positive_float),
    ("http.rate_limit_per_s", "DTRAG_RATE_LIMIT_PER_S", _non_negative_float),
    ("http.rate_limit_burst", "DTRAG_RATE_LIMIT_BURST", _positive_int),
    ("ray.address", "RAY_ADDRESS", _optional(_text)),
    ("ray.num_cpus", "DTRAG_RAY_NUM_CPUS", _optional(_positive_int)),
    ("ray.metrics_port", "DTRAG_METRICS_PORT", _port),
    ("ray.dashboard_port", "DTRAG_DASHBOARD_PORT", _port_or_off),
    ("rollout.live_refresh_s", "DTRAG_LIVE_REFRESH_S", _positive_float),
    ("rollout.treatment_replicas", "DTRAG_TREATMENT_REPLICAS", _optional(_positive_int)),
    ("rollout.plan", "DTRAG_ROLLOUT_PLAN", _rollout_plan),
    ("client.api_key", "DTRAG_API_KEY", _optional(_text)),
    ("retrieval.default_strategy", "DTRAG_DEFAULT_STRATEGY", lambda text: parse_strategy(text.strip())),
    ("retrieval.candidates", "DTRAG_CANDIDATES", _positive_int),
    ("retrieval.ef_search", "DTRAG_EF_SEARCH", _positive_int),
    ("retrieval.rrf_k", "DTRAG_RRF_K", _positive_int),
    ("retrieval.fusion_weight", "DTRAG_FUSION_WEIGHT", _unit_float),
    ("retrieval.fusion_grid", "DTRAG_FUSION_GRID", _weights),
    ("retrieval.bm25_k1", "DTRAG_BM25_K1", _non_negative_float),
    ("retrieval.bm25_b", "DTRAG_BM25_B", _unit_float),
    ("retrieval.lexical_postings_per_term", "DTRAG_LEXICAL_POSTINGS_PER_TERM", _non_negative_int),
    ("embedding.batch_size", "DTRAG_EMBED_BATCH_SIZE", _positive_int),
    ("embedding.max_batch_size", "DTRAG_EMBED_MAX_BATCH", _positive_int),
    ("serve.pipeline_replicas", "DTRAG_PIPELINE_REPLICAS", _optional(_positive_int)),
    ("serve.ingress_replicas", "DTRAG_INGRESS_REPLICAS", _optional(_positive_int)),
    ("serve.embedder_replicas", "DTRAG_EMBEDDER_REPLICAS", _optional(_positive_int)),
    ("serve.max_ongoing_requests", "DTRAG_MAX_ONGOING_REQUESTS", _positive_int),
    ("serve.health_check_period_s", "DTRAG_HEALTH_CHECK_PERIOD_S", _positive_float),
    ("serve.health_check_timeout_s", "DTRAG_HEALTH_CHECK_TIMEOUT_S", _positive_float),
    ("serve.deployments", "DTRAG_SERVE_CONFIG", _serve_deployments),
    ("learning.capacity", "DTRAG_REPLAY_CAPACITY", _positive_int),
    ("learning.alpha", "DTRAG_REPLAY_ALPHA", _non_negative_float),
    ("learning.beta0", "DTRAG_REPLAY_BETA0", _unit_float),
    ("learning.beta_steps", "DTRAG_REPLAY_BETA_STEPS", _positive_int),
    ("learning.tau", "DTRAG_SOFTQ_TAU", _positive_float),
    ("learning.lr", "DTRAG_SOFTQ_LR", _unit_float),
    ("learning.prior_count", "DTRAG_SOFTQ_PRIOR_COUNT", _non_negative_float),
    ("learning.margin", "DTRAG_POLICY_MARGIN", _non_negative_float),
    ("learning.explore_max", "DTRAG_EXPLORE_MAX", _unit_float),
    ("learning.cost_weight", "DTRAG_COST_WEIGHT", _non_negative_float),
    ("learning.context_bins", "DTRAG_CONTEXT_BINS", _bins),
    ("learning.gamma", "DTRAG_SOFTQ_GAMMA", _unit_float),
    ("learning.samples_per_insert", "DTRAG_SAMPLES_PER_INSERT", _positive_float),
    ("learning.min_replay_size", "DTRAG_MIN_REPLAY_SIZE", _positive_int),
    ("learning.max_staleness", "DTRAG_MAX_STALENESS", _non_negative_int),
    ("learning.batch_size", "DTRAG_LEARNER_BATCH_SIZE", _positive_int),
    ("learning.learners", "DTRAG_LEARNERS", _positive_int),
    ("learning.replay_shards", "DTRAG_REPLAY_SHARDS", _positive_int),
    ("learning.checkpoint_interval_s", "DTRAG_CHECKPOINT_INTERVAL_S", _positive_float),
    ("learning.policy_refresh_s", "DTRAG_POLICY_REFRESH_S", _positive_float),
    ("learning.experience_queue", "DTRAG_EXPERIENCE_QUEUE", _positive_int),
    ("learning.experience_flush_s", "DTRAG_EXPERIENCE_FLUSH_S", _positive_float),
    ("retention.max_age_days", "DTRAG_RETENTION_MAX_AGE_DAYS", _non_negative_float),
    ("retention.max_rows", "DTRAG_RETENTION_MAX_ROWS", _non_negative_int),
    ("retention.interval_s", "DTRAG_RETENTION_INTERVAL_S", _non_negative_float),
    ("retention.export_dir", "DTRAG_RETENTION_EXPORT_DIR", _optional(_text)),
    ("promotion.margin", "DTRAG_PROMOTION_MARGIN", _non_negative_float),
    ("promotion.judge_rows", "DTRAG_PROMOTION_JUDGE_ROWS", _positive_int),
    ("promotion.min_rows", "DTRAG_PROMOTION_MIN_ROWS", _positive_int),
    ("answers.provider", "DTRAG_ANSWER_PROVIDER", _choice(("auto", "extractive", "gemini", "openai"))),
    ("answers.default_mode", "DTRAG_ANSWER_MODE", _choice(("auto", "extractive", "generated", "debate"))),
    ("answers.budget_s", "DTRAG_ANSWER_BUDGET_S", _positive_float),
    ("answers.call_timeout_s", "DTRAG_ANSWER_CALL_TIMEOUT_S", _positive_float),
    ("answers.attempts", "DTRAG_ANSWER_ATTEMPTS", _positive_int),
    ("answers.backoff_s", "DTRAG_ANSWER_BACKOFF_S", _non_negative_float),
    ("answers.max_backoff_s", "DTRAG_ANSWER_MAX_BACKOFF_S", _non_negative_float),
    ("answers.passages", "DTRAG_ANSWER_PASSAGES", _positive_int),
    ("answers.max_prompt_chars", "DTRAG_ANSWER_MAX_PROMPT_CHARS", _positive_int),
    ("answers.max_output_tokens", "DTRAG_ANSWER_MAX_OUTPUT_TOKENS", _positive_int),
    ("gemini.api_key", "GEMINI_API_KEY", _optional(_text)),
    ("gemini.model", "DTRAG_GEMINI_MODEL", _text),
    ("gemini.base_url", "DTRAG_GEMINI_BASE_URL", _optional(_text)),
    ("openai.base_url", "DTRAG_OPENAI_BASE_URL", _optional(_text)),
    ("openai.model", "DTRAG_OPENAI_MODEL", _optional(_text)),
    ("openai.api_key", "DTRAG_OPENAI_API_KEY", _optional(_text)),
    *((f"features.{flag}", f"FEATURE_{flag.upper()}", _parse_bool) for flag in Flag),
)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse `KEY=value` lines (blank lines and `#` comments skipped, optional quotes stripped)."""
    if not path.is_file():
        raise SettingsError(f"--env-file {path}: no such file")
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--env-file {path}, line {number}: expected KEY=value")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def _defaults() -> dict[str, Any]:
    text = resources.files("configs").joinpath("settings.yaml").read_text()
    return yaml.safe_load(text)


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[part]
    return node


def settings_for_command(env_file: Path | None) -> Settings | None:
    """A command line's settings, with logging set up from them; None, said on stderr, when the
    configuration is wrong (the caller exits 2)."""
    try:
        settings = load_settings(env_file)
    except SettingsError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return None
    configure_logging(settings.log_level)
    return settings


def load_settings(
    env_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings; raises `SettingsError` naming the first bad variable."""
    environment = dict(read_env_file(env_file)) if env_file else {}
    environment.update(os.environ if environ is None else environ)
    defaults = _defaults()

    values: dict[str, Any] = {}
    for path, variable, parse in _FIELDS:
        raw = environment.get(variable)
        source = variable
        if raw is None:
            default = _lookup(defaults, path)
            raw = "null" if default is None else str(default)
            source = f"{path} in configs/settings.yaml"
        try:
            values[path] = parse(raw)
        except ValueError as error:
            raise SettingsError(f"{source}={raw!r}: {error}") from None

    def section(name: str) -> dict[str, Any]:
        prefix = f"{name}."
        return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}

    return Settings(
        environment=values["environment"],
        log_level=values["log_level"],
        state_dir=Path(values["state_dir"]).resolve(),
        database=DatabaseSettings(**section("database")),
        http=HttpSettings(**section("http")),
        ray=RaySettings(**section("ray")),
        retrieval=_retrieval_settings(section("retrieval")),
        embedding=EmbeddingSettings(**section("embedding")),
        serve=ServeSettings(**section("serve")),
        learning=LearningSettings.from_section(section("learning")),
        retention=RetentionSettings(**section("retention")),
        promotion=PromotionSettings(**section("promotion")),
        rollout=RolloutSettings(**section("rollout")),
        client=ClientSettings(**section("client")),
        features=FeatureFlags(**section("features")),
        answers=_answer_settings(section("answers"), section("gemini"), section("openai")),
        gemini=GeminiSettings(**section("gemini")),
        openai=OpenAISettings(**section("openai")),
    )


def _retrieval_settings(retrieval: dict[str, Any]) -> RetrievalSettings:
    if retrieval["fusion_weight"] not in retrieval["fusion_grid"]:
        raise SettingsError(f"DTRAG_FUSION_WEIGHT={retrieval['fusion_weight']:g} must be one of the policy's "
                            f"weights, DTRAG_FUSION_GRID={','.join(f'{w:g}' for w in retrieval['fusion_grid'])}")
    return RetrievalSettings(**retrieval)


def _answer_settings(answers: dict[str, Any], gemini: Mapping[str, Any], openai: Mapping[str, Any]) -> AnswerSettings:
    """Resolve `auto` (Gemini with a key, else an OpenAI-compatible server with a URL, else extractive)
    and check that the chosen provider has what it needs."""
    provider = answers["provider"]
    if provider == "auto":
        provider = "gemini" if gemini["api_key"] else "openai" if openai["base_url"] else "extractive"
    if provider == "gemini" and not gemini["api_key"]:
        raise SettingsError("DTRAG_ANSWER_PROVIDER=gemini needs GEMINI_API_KEY")
    if provider == "openai" and not (openai["base_url"] and openai["model"]):
        raise SettingsError("DTRAG_ANSWER_PROVIDER=openai needs DTRAG_OPENAI_BASE_URL and DTRAG_OPENAI_MODEL")
    return AnswerSettings(**{**answers, "provider": provider})
