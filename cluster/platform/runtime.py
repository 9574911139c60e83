"""The Ray runtime: a local, loopback-only instance by default, or an existing cluster's address."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from cluster.platform.errors import ServiceUnavailable
from cluster.platform.ray_token import ensure_auth_token, require_token
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

    It patches Serve's replica module when a worker imports it, not before: importing Serve
    (with pandas, when installed) costs a worker about 65 MiB, which the workers that host no
    replica (the learning actors, the learners) need not pay.
    """
    patch_on_import("ray.serve._private.replica", _bind_to_node_ip)


def _bind_to_node_ip(replica: ModuleType) -> None:
    import ray

    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    bind = replica.add_port_to_grpc_server

    def bind_to_node_ip(server, address: str) -> int:
        return bind(server, address.replace("[::]", host, 1))

    replica.add_port_to_grpc_server = bind_to_node_ip


def patch_on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch` on module `name` once it is imported: now if it already is, else right after
    its code runs (a finder first on `sys.meta_path` wraps its loader, then steps aside)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Loader(importlib.abc.Loader):
        def __init__(self, inner: importlib.abc.Loader) -> None:
            self._inner = inner

        def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
            return self._inner.create_module(spec)

        def exec_module(self, module: ModuleType) -> None:
            self._inner.exec_module(module)
            patch(module)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                spec.loader = Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, Finder())


_SETUP_HOOK = f"{__name__}.{bind_replica_grpc_to_node_ip.__name__}"


def loopback_only_environment() -> None:
    """Keep a single-machine Ray on 127.0.0.1 and off the usage-stats endpoint.

    Must run before Ray starts its processes: they inherit this environment.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class RayUnavailable(ServiceUnavailable):
    """Ray could not be started or reached; the message says what to check."""


def _private_temp_dir(state_dir: Path) -> Path:
    """Ray's temp folder for the state folder's cluster: short (Ray's socket paths must fit a Unix
    socket's name) and its own, so nothing in it is shared with other Ray clusters here."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"dtrag-ray-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _record_own_address(temp_dir: Path) -> None:
    """Name our GCS as the "current cluster" of our temp folder.

    Ray's job server resolves a job driver's RAY_ADDRESS as "auto": the cluster the temp folder
    records, else any GCS running on the machine. Only `ray start` records one, so without this a
    job submitted to our cluster could be handed another cluster's address.
    """
    import ray
    from ray._private.utils import write_ray_address

    write_ray_address(ray.get_runtime_context().gcs_address, str(temp_dir))


@contextlib.contextmanager
def _agent_http_on_a_free_port() -> Iterator[None]:
    """The dashboard agent's HTTP port, which serves the job API, chosen free before Ray starts,
    as `ray start --dashboard-agent-listen-port` can and `ray.init` cannot (patched only while
    `ray.init` builds its parameters).

    Left to Ray it is 52365, which another Ray on the machine may hold: the agent then stays up
    without it, and jobs submitted to this cluster cannot start.
    """
    from ray._private import parameter

    original = parameter.RayParams.__init__
    port = free_port()

    def init(self, *args, **kwargs) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ray(settings: RaySettings, address: str | None = None, state_dir: Path | None = None) -> None:
    """Connect to `address` (or `settings.address`), else start a new local instance.

    Never Ray's own default of joining the last cluster `ray start` recorded on this machine:
    without an address we always start our own (`address="local"`), so a cluster someone
    else started, or a stale record of one, neither captures us nor stalls the start.

    A local instance runs Ray's dashboard, whose job server `ray job submit` and `serve deploy`
    talk to, on 127.0.0.1 at `settings.dashboard_port` (0: no dashboard). Given the `state_dir`,
    it requires the folder's token (`ensure_auth_token`) and keeps Ray's files in a temp folder
    of its own, so jobs submitted to it run on it.
    """
    loopback_only_environment()
    import ray
    from ray._private import ray_constants

    target = address or settings.address
    target = None if target == "local" else target
    if ray_constants.ENABLE_RAY_CLUSTER and not target:
        raise RuntimeError(
            "ray was imported before loopback_only_environment() ran, so a local Ray would talk over "
            "the machine's network address; call it before anything imports ray"
        )
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        if target:
            _check_reachable(target)
            ray.init(address=target, logging_level=logging.WARNING)
        else:
            temp_dir = None
            if state_dir is not None:
                require_token(ensure_auth_token(state_dir))
                temp_dir = _private_temp_dir(state_dir)
            dashboard = settings.dashboard_port > 0
            with _agent_http_on_a_free_port():
                ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=dashboard,
                         dashboard_host="127.0.0.1", dashboard_port=settings.dashboard_port if dashboard else None,
                         logging_level=logging.WARNING, _metrics_export_port=settings.metrics_port,
                         _temp_dir=str(temp_dir) if temp_dir else None,
                         runtime_env={"worker_process_setup_hook": _SETUP_HOOK})
            if temp_dir:
                _record_own_address(temp_dir)
    except RayUnavailable:
        raise
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        what = f"connect to the Ray cluster at {target}" if target else "start a local Ray"
        raise RayUnavailable(f"could not {what}: {type(error).__name__}: {error}") from error
    log.info("ray ready", extra={"address": target or "local"})


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing answers at a Ray address.

    `auto` resolves to the cluster `ray start` last recorded, which may be long gone; Ray
    itself then retries its GCS for minutes.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = address if address.startswith("ray://") else canonicalize_bootstrap_address(address)
    except ConnectionError as error:
        raise RayUnavailable(f"no Ray cluster to join at {address!r}: {error}") from error
    host, _, port = (resolved or "").removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise RayUnavailable(
            f"nothing answers at the Ray address {resolved or address}"
            + (f" (resolved from {address!r})" if resolved != address else "")
            + f": {error}; start that cluster, or unset RAY_ADDRESS / --address to start a local one"
        ) from error


def record_session(record: Path) -> None:
    """Note the local Ray's session folder, so a later start can clean up after a `kill -9`."""
    from ray._private import worker

    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(worker.global_worker.node.get_session_dir_path())


def stop_leftover_ray(record: Path) -> int:
    """Stop what is left of the local Ray that `record` names if its driver died without stopping it.

    A `kill -9` of the driver takes Ray's GCS and raylet with it, but its agents live on for
    minutes, holding the metrics port. The session folder's name ends with the driver's pid.
    Returns how many processes were stopped.
    """
    import psutil

    try:
        session = Path(record.read_text().strip())
        driver = int(session.name.rsplit("_", 1)[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0
    if psutil.pid_exists(driver):
        return 0
    leftovers = [process for process in psutil.process_iter(["cmdline"]) if _of_session(process, session.name)]
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(leftovers, timeout=5)
    record.unlink(missing_ok=True)
    if leftovers:
        log.warning("stopped Ray processes left running by an earlier run",
                    extra={"session": str(session), "processes": len(leftovers)})
    return len(leftovers)


def _of_session(process, session: str) -> bool:
    """Whether a process belongs to the Ray session: named on its command line or, for the ones
    that retitle themselves (`ray::DashboardAgent`), by the session's log files they hold open."""
    import psutil

    cmdline = " ".join(process.info["cmdline"] or ())
    try:
        return session in cmdline or (
            cmdline.startswith("ray::") and any(session in file.path for file in process.open_files()))
    except psutil.Error:
        return False


def check_port_free(host: str, port: int, variable: str) -> None:
    """Fail before starting anything when a port we are about to listen on is taken.

    Ray's metrics exporter and Serve's proxy would otherwise fail inside Ray, far from a message
    an operator can act on.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise RayUnavailable(
                f"port {port} on {host} is in use ({error.strerror}): another dtrag up or Ray runs "
                f"on this machine; stop it or set {variable} to a free port"
            ) from None


def start_serve(http: HttpSettings, proxy_location: str = "EveryNode") -> None:
    """Start Serve's proxy with our HTTP edge in front of it (body limit, request ids, JSON errors).

    The edge reaches the proxy through its controller's environment, which the proxy inherits;
    it applies only when this call creates the controller. `proxy_location`: "HeadOnly" where
    the nodes share one address and so cannot each listen on the same port (nodes on one machine).
    """
    from ray import serve

    from cluster.platform.edge import proxy_environment  # starlette: loaded only with Serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve sets its own INFO level
    serve.start(proxy_location=proxy_location, http_options={"host": http.host, "port": http.port},
                logging_config=SERVE_LOGGING,
                controller_options={"runtime_env": {"env_vars": proxy_environment(http.max_body_bytes, http.max_candidate_bytes)}})


def deploy(application, name: str) -> None:
    """Run the application under `name` at `/`, with the same quiet logging as Serve itself."""
    from ray import serve

    serve.run(application, name=name, route_prefix="/", logging_config=SERVE_LOGGING)


def running_replicas(app: str, names: tuple[str, ...]) -> dict[str, int]:
    """How many replicas of each named deployment of `app` Serve reports running now (under
    autoscaling this moves, so callers that count replicas ask rather than read the settings)."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: sum(n for state, n in deployments[name].replica_states.items() if str(state).endswith("RUNNING"))
            for name in names}
