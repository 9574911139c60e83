"""Deployment options from the Serve config: what `dtrag up` and `serve deploy` share, and the
rule that a fixed count in the settings replaces a deployment's autoscaling."""

from pathlib import Path

import pytest
import yaml

from cluster.core.deployments import ARM_CONTROL, ARM_TREATMENT, DEPLOYMENTS, EMBEDDER, INGRESS
from cluster.platform.serve_config import deployment_options, most_replicas
from cluster.platform.settings import SettingsError, load_settings

SERVE_YAML = Path(__file__).parents[2] / "configs" / "serve.yaml"


def write_config(tmp_path: Path, change) -> str:
    config = yaml.safe_load(SERVE_YAML.read_text())
    change({d["name"]: d for d in config["applications"][0]["deployments"]})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_shipped_config_autoscales_the_arms_and_the_embedder_and_fixes_the_ingress():
    settings = load_settings(environ={})
    for name in (ARM_CONTROL, ARM_TREATMENT, EMBEDDER):
        scaling = deployment_options(settings, name)["autoscaling_config"]
        assert 1 == scaling["min_replicas"] < scaling["max_replicas"]
        assert scaling["target_ongoing_requests"] > 0
        assert 0 < scaling["upscale_delay_s"] < scaling["downscale_delay_s"]
    assert deployment_options(settings, INGRESS) == {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}
    assert all(deployment_options(settings, name)["ray_actor_options"]["num_cpus"] > 0 for name in DEPLOYMENTS)


def test_a_fixed_count_replaces_that_deployments_autoscaling_only():
    settings = load_settings(environ={"DTRAG_PIPELINE_REPLICAS": "2", "DTRAG_EMBEDDER_REPLICAS": "1"})
    assert deployment_options(settings, ARM_CONTROL) == {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    assert deployment_options(settings, EMBEDDER) == {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}
    assert "autoscaling_config" in deployment_options(settings, ARM_TREATMENT)
    assert most_replicas(settings, ARM_CONTROL) == 2
    assert most_replicas(settings, ARM_TREATMENT) == 3  # at its autoscaling maximum
    assert most_replicas(settings, INGRESS) == 1


def test_serve_accepts_the_options_as_the_deployments_configuration():
    from serve_app.arm import PipelineArm

    scaled = PipelineArm.options(**deployment_options(load_settings(environ={}), ARM_CONTROL))
    config = scaled._deployment_config
    assert config.autoscaling_config.max_replicas == 3 and "num_replicas" not in config.user_configured_option_names
    assert scaled.ray_actor_options == {"num_cpus": 0.25}
    pinned = PipelineArm.options(**deployment_options(load_settings(environ={"DTRAG_PIPELINE_REPLICAS": "2"}),
                                                      ARM_CONTROL))
    assert pinned._deployment_config.num_replicas == 2 and pinned._deployment_config.autoscaling_config is None


def test_another_config_file_is_read_through_dtrag_serve_config(tmp_path):
    def shorter(deployments):
        deployments[EMBEDDER]["autoscaling_config"]["downscale_delay_s"] = 20

    settings = load_settings(environ={"DTRAG_SERVE_CONFIG": write_config(tmp_path, shorter)})
    assert deployment_options(settings, EMBEDDER)["autoscaling_config"]["downscale_delay_s"] == 20


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d[INGRESS].update(autoscaling_config={"max_replicas": 2}), "Ingress: set either num_replicas"),
    (lambda d: d[EMBEDDER].pop("ray_actor_options"), "Embedder: ray_actor_options .* is required"),
    (lambda d: d[ARM_CONTROL].update(health_check_period_s=5), "health_check_period_s belong in configs/settings"),
    (lambda d: d[ARM_TREATMENT].update(name="arm_canary"), "'arm_canary': expected each of"),
])
def test_a_wrong_config_names_the_variable_and_the_deployment(tmp_path, change, message):
    with pytest.raises(SettingsError, match=f"DTRAG_SERVE_CONFIG=.*{message}"):
        load_settings(environ={"DTRAG_SERVE_CONFIG": write_config(tmp_path, change)})


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="DTRAG_SERVE_CONFIG=.*no such file"):
        load_settings(environ={"DTRAG_SERVE_CONFIG": str(tmp_path / "absent.yaml")})


def test_serve_build_renders_the_graph_as_the_shipped_config_sets_it():
    """What `serve build` would write for the graph `dtrag up` binds (Serve's own build and schema;
    the CLI itself takes an Application object, and this graph needs its actors running first)
    agrees with configs/serve.yaml on every option the file sets."""
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema

    from cluster.actors.start import ClusterActors
    from serve_app.app import APP_NAME, bind_app

    settings = load_settings(environ={})
    not_started = ClusterActors(rollout_control=None, learning_state=None, learner_driver=None)  # bound, never called
    built = build_app(bind_app(settings, not_started), name=APP_NAME)
    rendered = {d.name: deployment_to_schema(d).model_dump(exclude_unset=True) for d in built.deployments}
    shipped = yaml.safe_load(SERVE_YAML.read_text())["applications"][0]
    assert shipped["name"] == APP_NAME and set(rendered) == set(DEPLOYMENTS)
    for entry in shipped["deployments"]:
        assert {key: rendered[entry["name"]][key] for key in entry} == entry
    # what the file leaves to the settings is set in the code, never left to Serve's defaults
    assert all({"max_ongoing_requests", "health_check_period_s"} <= set(options) for options in rendered.values())
