"""The Ray runtime: a local, loopback-only instance by default, or an existing cluster's address."""

from __future__ import annotations

import logging
import os

from cluster.platform.settings import HttpSettings, RaySettings

log = logging.getLogger(__name__)

SERVE_LOGGING = {"encoding": "JSON", "log_level": "WARNING", "enable_access_log": False}


def bind_replica_grpc_to_node_ip() -> None:
    """Worker setup hook: a Serve replica's inter-deployment gRPC server listens on its node's address.

    Ray 2.60 binds that server to `[::]` (every interface, no setting to change it:
    ray-project/ray#64544), although callers only ever dial it at the replica's node IP. Binding
    to that IP changes nothing for them, and on a local cluster (127.0.0.1) nothing listens off
    loopback. `start_ray` installs it as the job's worker setup hook (Ray ignores one given per
    actor), so it runs in every worker of a local cluster before a replica starts its servers.
    """
    import ray
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    bind = replica.add_port_to_grpc_server

    def bind_to_node_ip(server, address: str) -> int:
        return bind(server, address.replace("[::]", host, 1))

    replica.add_port_to_grpc_server = bind_to_node_ip


_SETUP_HOOK = f"{__name__}.{bind_replica_grpc_to_node_ip.__name__}"


def loopback_only_environment() -> None:
    """Keep a single-machine Ray on 127.0.0.1 and off the usage-stats endpoint.

    Must run before Ray starts its processes: they inherit this environment.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray(settings: RaySettings, address: str | None = None) -> None:
    """Connect to `address` (or `settings.address`), else start a local instance."""
    loopback_only_environment()
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER and not (address or settings.address):
        raise RuntimeError(
            "ray was imported before loopback_only_environment() ran, so a local Ray would talk over "
            "the machine's network address; call it before anything imports ray"
        )
    logging.getLogger("ray").setLevel(logging.WARNING)
    target = address or settings.address
    if target:
        ray.init(address=target, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=settings.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 _metrics_export_port=settings.metrics_port,
                 runtime_env={"worker_process_setup_hook": _SETUP_HOOK})
    log.info("ray ready", extra={"address": target or "local"})


def start_serve(http: HttpSettings) -> None:
    """Start Serve's proxy with our HTTP edge in front of it (body limit, request ids, JSON errors).

    The edge reaches the proxy through its controller's environment, which the proxy inherits;
    it applies only when this call creates the controller.
    """
    from ray import serve

    from cluster.platform.edge import proxy_environment  # starlette: loaded only with Serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve sets its own INFO level
    serve.start(http_options={"host": http.host, "port": http.port}, logging_config=SERVE_LOGGING,
                controller_options={"runtime_env": {"env_vars": proxy_environment(http.max_body_bytes)}})


def deploy(application, name: str) -> None:
    """Run the application under `name` at `/`, with the same quiet logging as Serve itself."""
    from ray import serve

    serve.run(application, name=name, route_prefix="/", logging_config=SERVE_LOGGING)
