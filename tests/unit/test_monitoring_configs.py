"""Prometheus and Grafana files in configs/: valid, and about the metrics the service exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).parents[2] / "configs"
EXPORTED = {"ray_arm_requests_total", "ray_arm_errors_total", "ray_pipeline_latency_seconds_bucket",
            "ray_pipeline_latency_seconds_count",
            "ray_replay_buffer_size", "ray_rollout_weight", "ray_context_model_active", "ray_exploration_rate",
            "ray_policy_version",
            "ray_batch_learning_success_total", "ray_experiences_dropped_total", "ray_component_rss_mb",
            "ray_answer_fallbacks_total", "ray_answer_latency_seconds_count"}


def test_alert_rules_have_the_operators_thresholds():
    rules = {r["alert"]: r for g in yaml.safe_load((CONFIGS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    expected = {"ReplicaMemoryHigh": ("> 800", "5m"), "SearchLatencyP95High": ("> 5", "5m"),
                "SearchErrorRateHigh": ("> 0.01", "2m"), "ReplayBufferOverfull": ("> 12000", "10m"),
                "AnswerFallbackRateHigh": ("> 0.2", "10m")}
    assert set(rules) == set(expected)
    for name, (threshold, duration) in expected.items():
        assert rules[name]["expr"].strip().endswith(threshold), name
        assert rules[name]["for"] == duration and rules[name]["annotations"]["summary"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt: prometheus)")
def test_promtool_accepts_rules_and_config():
    for command in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        result = subprocess.run(["promtool", *command], cwd=CONFIGS, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_referenced_is_exported():
    texts = [(CONFIGS / "alerts.yml").read_text(), (CONFIGS / "grafana_dashboard.json").read_text()]
    referenced = {word for text in texts for word in re.findall(r"ray_[a-z_]+", text)}
    assert referenced <= EXPORTED, referenced - EXPORTED


def test_dashboard_is_valid_json_with_panels():
    dashboard = json.loads((CONFIGS / "grafana_dashboard.json").read_text())
    assert dashboard["title"] and len(dashboard["panels"]) >= 8
    assert all(panel["targets"][0]["expr"] for panel in dashboard["panels"])
