"""The Serve application's deployments by name, and the options the Serve config
(`configs/serve.yaml`) may give each: replicas (fixed or autoscaled) and resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.core.vocabulary import Arm

INGRESS, EMBEDDER = "Ingress", "Embedder"
ARM_DEPLOYMENTS = {arm: f"arm_{arm}" for arm in Arm}  # one deployment per arm
ARM_CONTROL, ARM_TREATMENT = ARM_DEPLOYMENTS[Arm.CONTROL], ARM_DEPLOYMENTS[Arm.TREATMENT]
DEPLOYMENTS = (INGRESS, ARM_CONTROL, ARM_TREATMENT, EMBEDDER)
# What a deployment entry may set here; everything else (health checks, max_ongoing_requests)
# comes from configs/settings.yaml, so it has one home.
_KEYS = {"name", "num_replicas", "autoscaling_config", "ray_actor_options"}


def parse_deployments(config: Any) -> dict[str, dict[str, Any]]:
    """The options of each deployment of the one application in a Serve config, by name
    (without `name`); `ValueError` saying what is wrong."""
    try:
        (application,) = config["applications"]
        entries = application["deployments"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("expected a Serve config with one application and its `deployments`") from None
    options: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if name not in DEPLOYMENTS or name in options:
            raise ValueError(f"deployment {name!r}: expected each of {', '.join(DEPLOYMENTS)} once")
        if unknown := set(entry) - _KEYS:
            raise ValueError(f"deployment {name}: {', '.join(sorted(unknown))} belong in configs/settings.yaml "
                             f"(here only {', '.join(sorted(_KEYS - {'name'}))})")
        if ("num_replicas" in entry) == ("autoscaling_config" in entry):
            raise ValueError(f"deployment {name}: set either num_replicas or autoscaling_config")
        if not isinstance(entry.get("ray_actor_options"), Mapping):
            raise ValueError(f"deployment {name}: ray_actor_options (its resources) is required")
        options[name] = {key: value for key, value in entry.items() if key != "name"}
    if missing := [name for name in DEPLOYMENTS if name not in options]:
        raise ValueError(f"no entry for deployment(s) {', '.join(missing)}")
    return options
