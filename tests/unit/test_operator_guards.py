"""Guards around the operators' commands that need no server: who owns a state folder, taken
ports, missing client programs, where a database password goes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from cluster.cli.main import main as dtrag
from cluster.platform import pg_tools
from cluster.platform.embedded import EmbeddedServerError, claim_state_dir, running_postmaster


def test_a_claimed_state_folder_is_refused_with_its_owner_and_free_again_after(tmp_path: Path):
    with claim_state_dir(tmp_path, "dtrag up"):
        with pytest.raises(EmbeddedServerError, match=rf"in use by dtrag up \(pid {os.getpid()}\)"):
            with claim_state_dir(tmp_path, "dtrag restore"):
                pass
    with claim_state_dir(tmp_path, "dtrag restore"):
        assert (tmp_path / "owner.lock").read_text() == f"dtrag restore (pid {os.getpid()})"


def test_a_postmaster_pid_file_naming_no_postgres_is_no_server(tmp_path: Path):
    assert running_postmaster(tmp_path) is None
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path}\n")  # alive, but python
    assert running_postmaster(tmp_path) is None


def test_the_password_travels_in_the_environment_not_on_the_command_line():
    dbname, env = pg_tools._connection("postgresql://search:s3cret@db.internal:5432/search?sslmode=require")
    assert dbname == "postgresql://search@db.internal:5432/search?sslmode=require"
    assert env["PGPASSWORD"] == "s3cret"
    socket_url = "postgresql://postgres:@/postgres?host=/srv/state/pgdata"
    assert pg_tools._connection(socket_url)[0] == socket_url


def test_a_missing_client_program_names_what_to_install(tmp_path: Path):
    with pytest.raises(pg_tools.PgToolError, match="pg_dump not found in .*install PostgreSQL's client"):
        pg_tools.program("pg_dump", tmp_path)


def test_dtrag_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path, http_port: int,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("DTRAG_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DTRAG_HTTP_PORT", str(http_port))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.create_server(("127.0.0.1", http_port)):
        assert dtrag(["up"]) == 1
    assert f"port {http_port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
