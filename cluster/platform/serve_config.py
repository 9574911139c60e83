"""Each deployment's replicas and resources, read from the Serve config (`configs/serve.yaml`).

`serve deploy configs/serve.yaml` applies the file's deployment options over the code's, and
`dtrag up` (`serve_app.app.build_app`) passes the same file's options itself, so the two cannot
drift. A replica count pinned in the settings (`DTRAG_PIPELINE_REPLICAS`, ...) replaces that
deployment's autoscaling with the fixed count; it is how tests and drills get a known number.
"""

from __future__ import annotations

from typing import Any

from cluster.core.deployments import ARM_CONTROL, ARM_TREATMENT, EMBEDDER, INGRESS
from cluster.platform.settings import Settings


def pinned_replicas(settings: Settings) -> dict[str, int | None]:
    """The fixed count the settings give each deployment; None: as the Serve config says."""
    return {INGRESS: settings.serve.ingress_replicas, ARM_CONTROL: settings.serve.pipeline_replicas,
            ARM_TREATMENT: settings.rollout.treatment_replicas, EMBEDDER: settings.serve.embedder_replicas}


def deployment_options(settings: Settings, name: str) -> dict[str, Any]:
    """What `Deployment.options` gets for `name`: the Serve config's entry, with a pinned count
    in place of its autoscaling."""
    options = dict(settings.serve.deployments[name])
    pinned = pinned_replicas(settings)[name]
    if pinned is not None:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = pinned
    return options


def most_replicas(settings: Settings, name: str) -> int:
    """The most replicas `name` may run: its fixed count, or its autoscaling maximum."""
    options = deployment_options(settings, name)
    scaling = options.get("autoscaling_config")
    return int(scaling.get("max_replicas", 1)) if scaling else int(options["num_replicas"])
