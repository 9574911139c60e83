"""deploy/: the Ray cluster launcher config and the KubeRay RayService, valid and in step with
configs/serve.yaml and pyproject.toml."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def ray_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (version,) = [m.group(1) for d in dependencies if (m := re.fullmatch(r"ray\[[\w,]+\]==([\d.]+)", d))]
    return version


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load(DEPLOY / "ray-cluster.yaml")


@pytest.fixture(scope="module")
def service() -> dict:
    return load(DEPLOY / "kuberay-rayservice.yaml")


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return load(ROOT / "configs" / "serve.yaml")


def test_launcher_config_passes_rays_own_validation(launcher):
    validate_config(prepare_config(launcher))  # what `ray up` runs first


def test_launcher_has_a_head_and_an_autoscaled_worker_type_with_placeholders_marked(launcher):
    types = launcher["available_node_types"]
    assert set(types) == {"head", "worker"} and launcher["head_node_type"] == "head"
    worker = types["worker"]
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= launcher["max_workers"]
    assert launcher["idle_timeout_minutes"] > 0
    provider = launcher["provider"]
    assert provider["region"].startswith("REPLACE_ME") and provider["use_internal_ips"] is True
    for node_type in types.values():
        config = node_type["node_config"]
        assert config["ImageId"].startswith("REPLACE_ME")
        assert all(v.startswith("REPLACE_ME") for v in config["SubnetIds"] + config["SecurityGroupIds"])


def test_launcher_installs_the_project_with_pyprojects_ray(launcher, ray_pin):
    commands = launcher["setup_commands"]
    pins = {m.group(1) for c in commands for m in re.finditer(r"ray\[[\w,]+\]==([\d.]+)", c)}
    assert pins == {ray_pin}
    assert launcher["file_mounts"]["~/dtrag-cluster"] == "."  # the repository, `ray up` run from its root
    assert "pip install ~/dtrag-cluster" in commands
    assert (ROOT / launcher["file_mounts"]["~/dtrag.env"]).with_suffix(".env.example").is_file()
    assert ".venv" in launcher["rsync_exclude"] and ".git" in launcher["rsync_exclude"]


def test_launcher_head_serves_the_dashboard_on_its_private_address_behind_token_auth(launcher):
    (head_start,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "ray start --head" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert re.search(r"--dashboard-host=\$\(hostname -I \| cut -d\" \" -f1\)", head_start)
    assert "0.0.0.0" not in head_start
    (worker_start,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert "RAY_AUTH_MODE=token" in worker_start and "--address=$RAY_HEAD_IP:6379" in worker_start
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    assert any("RAY_AUTH_MODE=token" in c for c in launcher["setup_commands"])  # the CLI on a node too


def test_rayservice_runs_rays_autoscaler_with_token_auth(service, ray_pin):
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == ray_pin
    head = cluster["headGroupSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    containers = head["template"]["spec"]["containers"] + group["template"]["spec"]["containers"]
    assert {c["image"] for c in containers} == {"REPLACE_ME_REGISTRY/dtrag-cluster:0.1.0"}
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "dtrag-database", "key": "url"}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py311-cpu$", dockerfile, re.M)


def test_rayservice_serve_config_is_configs_serve_yaml(service, serve_config):
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_v2)  # field types and required fields, by Serve's own schema
    ServeDeploySchema.model_validate(serve_config)
    assert serve_v2["applications"] == serve_config["applications"]
    (app,) = serve_v2["applications"]
    (expected,) = serve_config["applications"]
    assert app["import_path"] == expected["import_path"] == "serve_app.app:app_builder"
    for ours, theirs in zip(app["deployments"], expected["deployments"], strict=True):
        for key in ("name", "num_replicas", "autoscaling_config", "ray_actor_options"):
            assert ours.get(key) == theirs.get(key), (ours["name"], key)
    assert serve_v2["logging_config"] == serve_config["logging_config"]
    # only the proxy differs: on every pod's interfaces, where KubeRay's Serve Service reaches it
    assert serve_v2["http_options"] == {**serve_config["http_options"], "host": "0.0.0.0"}
    assert serve_v2["proxy_location"] == "EveryNode"


def test_rayservice_workers_can_hold_every_replica_at_its_maximum(service):
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker_cpus = float(group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    deployments = serve_v2["applications"][0]["deployments"]
    most = [d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1)) for d in deployments]
    cpus = [d["ray_actor_options"]["num_cpus"] for d in deployments]
    assert max(cpus) <= worker_cpus
    assert sum(n * c for n, c in zip(most, cpus)) <= group["maxReplicas"] * worker_cpus
