"""The application graph: Ingress -> arms (control, treatment: PipelineArm) -> Embedder.

The cluster's actors are started here, once, and handed to the deployments that use them.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.actors.start import ClusterActors, start_actors
from cluster.core.deployments import ARM_DEPLOYMENTS, EMBEDDER, INGRESS
from cluster.core.vocabulary import ARMS
from cluster.platform.connection_budget import verify_connection_budget
from cluster.platform.database import run_blocking
from cluster.platform.serve_config import deployment_options
from cluster.platform.settings import Settings, SettingsError, load_settings
from serve_app.arm import PipelineArm
from serve_app.embedder import Embedder
from serve_app.ingress import Ingress

APP_NAME = "dtrag"


def build_app(settings: Settings) -> Application:
    """Start the actors and bind the deployments; `settings.database.url` must point at a live database.

    Needs a connected Ray (`cluster.platform.runtime.start_ray`), as `serve deploy` has.
    """
    return bind_app(settings, start_actors(settings))


def bind_app(settings: Settings, actors: ClusterActors) -> Application:
    """The deployment graph over running actors. Replicas and resources come from the Serve
    config (`configs/serve.yaml`), as under `serve deploy`; binding runs nothing, so the graph
    can be rendered the way `serve build` renders one (tests/unit/test_serve_config.py)."""
    serve = settings.serve
    health = {"health_check_period_s": serve.health_check_period_s,
              "health_check_timeout_s": serve.health_check_timeout_s}
    embedder = Embedder.options(
        **health, **deployment_options(settings, EMBEDDER),
        max_ongoing_requests=2 * settings.embedding.max_batch_size,  # room to fill a batch
    ).bind(settings.embedding.max_batch_size)
    arms = {
        arm: PipelineArm.options(
            **health, **deployment_options(settings, ARM_DEPLOYMENTS[arm]), name=ARM_DEPLOYMENTS[arm],
            max_ongoing_requests=serve.max_ongoing_requests,
        ).bind(settings, embedder, arm, actors.rollout_control, actors.learning_state)
        for arm in ARMS
    }
    return Ingress.options(
        **health, **deployment_options(settings, INGRESS), max_ongoing_requests=serve.max_ongoing_requests
    ).bind(settings, arms, actors)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for `serve deploy configs/serve.yaml`: settings come from the environment.

    `args` may name an `env_file`. The embedded database lives only as long as `dtrag up`, so
    a standalone deployment needs `DATABASE_URL`.
    """
    from pathlib import Path

    env_file = args.get("env_file")
    settings = load_settings(Path(env_file) if env_file else None)
    if not settings.database.url:
        raise SettingsError(
            "DATABASE_URL is not set: `serve deploy` needs an external PostgreSQL with pgvector "
            "(run `dtrag db migrate` against it first), or use `dtrag up` for the embedded one"
        )
    run_blocking(verify_connection_budget(settings.database.url, settings))  # a clear failure, not a crash loop
    return build_app(settings)
