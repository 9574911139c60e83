from pathlib import Path

import pytest

from cluster.core.vocabulary import FeatureFlags, Strategy
from cluster.platform.settings import SettingsError, load_settings, read_env_file


def test_defaults_come_from_configs():
    settings = load_settings(environ={})
    assert settings.database.url is None
    assert settings.http.host == "127.0.0.1"
    assert settings.retrieval.default_strategy is Strategy.HYBRID_COMPLETE
    assert settings.retrieval.fusion_grid == (0.3, 0.5, 0.7)
    assert settings.retrieval.actions[settings.retrieval.default_action].name == "hybrid@0.5"
    assert settings.features == FeatureFlags()  # every flag off
    assert settings.client.api_key is None
    assert [s.name for s in settings.rollout.plan.stages] == ["baseline", "replay_10", "softq_replay_50", "full"]


def test_environment_overrides_with_operator_names():
    settings = load_settings(environ={
        "ENVIRONMENT": "production",
        "DATABASE_URL": "postgresql://u:p@db:5432/search",
        "DB_POOL_SIZE": "8",
        "DB_MAX_OVERFLOW": "0",
        "LOG_LEVEL": "debug",
        "GEMINI_API_KEY": "k",
        "FEATURE_SOFT_Q_BANDIT": "on",
        "FEATURE_DEBATE_MODE": "false",
        "DTRAG_API_KEY": "dtrag_abc_secret",
    })
    assert settings.environment == "production"
    assert settings.database.url == "postgresql://u:p@db:5432/search"
    assert (settings.database.pool_size, settings.database.max_overflow) == (8, 0)
    assert settings.log_level == "DEBUG"
    assert settings.gemini.api_key == "k" and settings.answers.provider == "gemini"  # auto: a key chooses Gemini
    assert settings.features.soft_q_bandit is True
    assert settings.features.debate_mode is False
    assert settings.client.api_key == "dtrag_abc_secret"
    assert "'k'" not in repr(settings)  # the provider key never reaches a log line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DB_POOL_SIZE", "0"),
        ("DB_POOL_SIZE", "many"),
        ("DB_MAX_OVERFLOW", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("FEATURE_SOFT_Q_BANDIT", "maybe"),
        ("DTRAG_HTTP_PORT", "70000"),
        ("DTRAG_FUSION_WEIGHT", "1.5"),
        ("DTRAG_DEFAULT_STRATEGY", "magic"),
        ("ENVIRONMENT", "  "),
        ("DTRAG_ROLLOUT_PLAN", "/no/such/plan.yaml"),
        ("DTRAG_RETENTION_MAX_ROWS", "-1"),
        ("DTRAG_RETENTION_MAX_AGE_DAYS", "a month"),
        ("DTRAG_DASHBOARD_PORT", "-1"),
    ],
)
def test_invalid_value_fails_naming_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        load_settings(environ={variable: value})


def test_dashboard_port_defaults_to_rays_and_zero_turns_it_off():
    assert load_settings(environ={}).ray.dashboard_port == 8265
    assert load_settings(environ={"DTRAG_DASHBOARD_PORT": "0"}).ray.dashboard_port == 0


def test_env_file_is_read_and_real_environment_wins(tmp_path: Path):
    env_file = tmp_path / "prod.env"
    env_file.write_text("# operators' file\nENVIRONMENT=staging\nexport DB_POOL_SIZE='3'\n\n")
    assert read_env_file(env_file) == {"ENVIRONMENT": "staging", "DB_POOL_SIZE": "3"}
    settings = load_settings(env_file, environ={"ENVIRONMENT": "production"})
    assert settings.environment == "production"
    assert settings.database.pool_size == 3


def test_env_file_errors_name_file_and_line(tmp_path: Path):
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "missing.env", environ={})
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\nthis line has no equals\n")
    with pytest.raises(SettingsError, match="line 2"):
        load_settings(bad, environ={})


def test_rollout_plan_is_read_once_at_start_and_its_errors_name_the_variable(tmp_path: Path):
    shipped = Path(__file__).parents[2].joinpath("configs/rollout.yaml").read_text()
    plan = tmp_path / "plan.yaml"
    plan.write_text(shipped.replace("treatment_weight: 0.1", "treatment_weight: 0.2"))
    assert load_settings(environ={"DTRAG_ROLLOUT_PLAN": str(plan)}).rollout.plan.stages[1].treatment_weight == 0.2
    plan.write_text(shipped.replace("{experience_replay: true}", "{time_travel: true}"))
    with pytest.raises(SettingsError, match="DTRAG_ROLLOUT_PLAN.*unknown flag 'time_travel'"):
        load_settings(environ={"DTRAG_ROLLOUT_PLAN": str(plan)})


def test_the_answer_provider_follows_what_is_configured_and_needs_what_it_names():
    assert load_settings(environ={}).answers.provider == "extractive"
    openai = load_settings(environ={"DTRAG_OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "DTRAG_OPENAI_MODEL": "m"})
    assert openai.answers.provider == "openai" and openai.openai.model == "m"
    with pytest.raises(SettingsError, match="GEMINI_API_KEY"):
        load_settings(environ={"DTRAG_ANSWER_PROVIDER": "gemini"})
    with pytest.raises(SettingsError, match="DTRAG_OPENAI_BASE_URL"):
        load_settings(environ={"DTRAG_ANSWER_PROVIDER": "openai"})
    with pytest.raises(SettingsError, match="DTRAG_ANSWER_MODE"):
        load_settings(environ={"DTRAG_ANSWER_MODE": "poem"})
    secret = load_settings(environ={"GEMINI_API_KEY": "g-secret", "DTRAG_OPENAI_API_KEY": "o-secret"})
    assert "g-secret" not in repr(secret) and "o-secret" not in repr(secret)


def test_the_default_fusion_weight_must_be_one_of_the_policy_grid():
    retrieval = load_settings(environ={"DTRAG_FUSION_GRID": "0.2,0.6", "DTRAG_FUSION_WEIGHT": "0.6"}).retrieval
    assert [a.name for a in retrieval.actions] == ["lexical", "hybrid@0.2", "hybrid@0.2+prf", "hybrid@0.6",
                                                  "hybrid@0.6+prf"]
    assert retrieval.actions[retrieval.default_action].name == "hybrid@0.6"
    with pytest.raises(SettingsError, match="DTRAG_FUSION_WEIGHT=0.5 must be one of the policy's weights"):
        load_settings(environ={"DTRAG_FUSION_GRID": "0.2,0.6"})
    with pytest.raises(SettingsError, match="DTRAG_FUSION_GRID"):
        load_settings(environ={"DTRAG_FUSION_GRID": "0.2,0.2"})


def test_retention_defaults_keep_weeks_and_millions_and_zero_turns_a_limit_off():
    from cluster.data.retention import RetentionPolicy

    retention = load_settings(environ={}).retention
    assert (retention.max_age_days, retention.max_rows, retention.export_dir) == (28, 3_000_000, None)
    off = load_settings(environ={"DTRAG_RETENTION_MAX_AGE_DAYS": "0", "DTRAG_RETENTION_MAX_ROWS": "0",
                                 "DTRAG_RETENTION_EXPORT_DIR": "/backups/experiences"}).retention
    assert off.export_dir == "/backups/experiences"
    assert RetentionPolicy.from_settings(off, capacity=10) == RetentionPolicy(None, None, 10)
