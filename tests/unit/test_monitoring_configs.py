"""Prometheus and Grafana files in configs/: valid, and about the metrics the service exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.platform.metrics import MEMORY_KINDS

CONFIGS = Path(__file__).parents[2] / "configs"
EXPORTED = {"ray_arm_requests_total", "ray_arm_errors_total", "ray_pipeline_latency_seconds_bucket",
            "ray_pipeline_latency_seconds_count",
            "ray_replay_buffer_size", "ray_rollout_weight", "ray_context_model_active", "ray_exploration_rate",
            "ray_policy_version",
            "ray_batch_learning_success_total", "ray_experiences_dropped_total", "ray_process_rss_mb",
            "ray_answer_fallbacks_total", "ray_answer_latency_seconds_count"}


def test_alert_rules_have_the_operators_thresholds():
    rules = {r["alert"]: r for g in yaml.safe_load((CONFIGS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    expected = {"IngressMemoryHigh": ("> 600", "5m"), "ArmMemoryHigh": ("> 600", "5m"),
                "EmbedderMemoryHigh": ("> 1600", "5m"), "LearningActorMemoryHigh": ("> 800", "5m"),
                "SearchLatencyP95High": ("> 5", "5m"),
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


# Resident memory per process of a healthy cluster, MB: the largest of 60 samples while a benchmark
# served searches with learning on (README, "Alerts"); the embedder's is an earlier drill's 800 MB.
HEALTHY_RSS_MB = {"ingress": 233, "arm": 229, "embedder": 800, "learning": 334}
MARGIN = 1.75
MEMORY_RULE = re.compile(r'max by \(kind, pid\) \(ray_process_rss_mb\{kind="([a-z]+)"\}\) > (\d+)')


def memory_thresholds() -> dict[str, float]:
    """kind -> MB above which its alert fires, read from the rules Prometheus evaluates."""
    thresholds = {}
    for group in yaml.safe_load((CONFIGS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            if "process_rss_mb" in rule["expr"]:
                match = MEMORY_RULE.fullmatch(rule["expr"].strip())
                assert match, rule["expr"]
                assert match[1] not in thresholds, f"two rules for {match[1]}"
                thresholds[match[1]] = float(match[2])
    return thresholds


def test_each_deployment_kind_has_a_memory_threshold_a_healthy_cluster_stays_under():
    thresholds = memory_thresholds()
    assert set(thresholds) == set(MEMORY_KINDS) == set(HEALTHY_RSS_MB)
    for kind, healthy in HEALTHY_RSS_MB.items():
        assert thresholds[kind] >= MARGIN * healthy, (kind, thresholds[kind], healthy)


def test_the_rollout_guard_judges_arm_memory_by_the_arm_threshold():
    gates = yaml.safe_load((CONFIGS / "rollout.yaml").read_text())["gates"]
    assert gates["max_replica_memory_mb"] == memory_thresholds()["arm"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (apt: prometheus)")
def test_prometheus_fires_each_memory_alert_on_its_own_kind_only(tmp_path: Path):
    """Prometheus's own evaluation: a healthy embedder and four healthy learners (1,000 MB together)
    stay quiet; 700 MB fires for an ingress replica and not for an embedder."""
    series = {("embedder", "1"): 800, ("learning", "2"): 250, ("learning", "3"): 250, ("learning", "4"): 250,
              ("learning", "5"): 250, ("ingress", "6"): 700, ("embedder", "7"): 700, ("arm", "8"): 240}
    tests = {
        "rule_files": [str(CONFIGS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": f'ray_process_rss_mb{{kind="{kind}", pid="{pid}"}}', "values": f"{mb}x15"}
                             for (kind, pid), mb in series.items()],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "IngressMemoryHigh", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "kind": "ingress", "pid": "6"},
                    "exp_annotations": {
                        "summary": "An ingress replica uses more than 600 MB",
                        "description": "Process 6 has used 700 MB for 5 minutes (healthy: about 230 MB)."}}]},
                *({"eval_time": "10m", "alertname": name, "exp_alerts": []}
                  for name in ("ArmMemoryHigh", "EmbedderMemoryHigh", "LearningActorMemoryHigh")),
            ],
        }],
    }
    (tmp_path / "memory_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(["promtool", "test", "rules", "memory_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
