"""`dtrag` commands against the session's embedded database, and `dtrag up` as a user runs it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.cli.main import main as dtrag
from cluster.data.corpus import sample_corpus_dir
from cluster.jobs.common import read_summary
from cluster.platform.embedded import alive
from conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def cli_env(live_settings, monkeypatch):
    """Point the CLI at the session's state folder, so it joins the running embedded server."""
    monkeypatch.setenv("DTRAG_STATE_DIR", str(live_settings.state_dir))
    monkeypatch.delenv("DATABASE_URL", raising=False)


def test_db_status_and_keys_lifecycle(pool, cli_env, capsys):
    assert dtrag(["db", "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert dtrag(["db", "status"]) == 0
    assert "0001_documents" in capsys.readouterr().out

    assert dtrag(["keys", "create", "--name", "ci-bot", "--scope", "search", "--scope", "admin"]) == 0
    key = capsys.readouterr().out.strip()
    key_id = key.split("_")[1]
    assert dtrag(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "ci-bot" in listing and "admin,search" in listing
    assert key.split("_", 2)[2] not in listing
    assert dtrag(["keys", "revoke", key_id]) == 0
    assert dtrag(["keys", "revoke", key_id]) == 1
    assert "no active key" in capsys.readouterr().err


def test_bad_configuration_is_reported_with_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("DB_POOL_SIZE", "zero")
    assert dtrag(["db", "status"]) == 2
    assert "DB_POOL_SIZE" in capsys.readouterr().err


def test_ingest_reports_progress_and_bad_lines(fresh_database_url, monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    corpus = tmp_path / "extra.jsonl"
    corpus.write_text('{"_id": "cli-1", "title": "Tides", "text": "Tides follow the moon."}\nnot json\n')
    assert dtrag(["ingest", str(corpus)]) == 0
    captured = capsys.readouterr()
    assert "1 inserted" in captured.out and "docs/s" in captured.out
    assert "line 2: invalid JSON" in captured.err
    assert dtrag(["ingest", str(tmp_path / "missing")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert dtrag(["ingest", str(corpus)]) == 0
    assert "1 unchanged" in capsys.readouterr().out


def test_dtrag_up_quick_start_kill_9_and_ctrl_c(ray_start_cluster, tmp_path: Path, http_port: int):
    """`dtrag up` as users run it, in one story (each start costs a minute):

    1. beside a cluster `ray start` recorded as the machine's latest (Ray's default would join
       it), a fresh state folder: its own loopback-only Ray, the sample corpus, search, a Ray job;
    2. `kill -9`: its PostgreSQL and Ray's agents are left running;
    3. again on the same folder and ports, behind Ray's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY`,
       the faster front the README describes): it stops what was left, serves the
       first run's corpus with the same HTTP edge, and a third run on the folder is refused;
       Ctrl-C stops everything it started, HAProxy included.
    The `ray start` cluster is untouched throughout.
    """
    gcs_port, ray_env, gcs, raylet = ray_start_cluster
    state = tmp_path / "state"
    env = {**_up_env(state, http_port), "RAY_TMPDIR": ray_env["RAY_TMPDIR"]}
    first = _start_up(env)
    try:
        key, _ = _wait_for_key(first, deadline=time.monotonic() + 240)
        assert not _maps_torch(first.pid), "dtrag up kept the embedding model it loaded the sample corpus with"
        own = psutil.Process(first.pid).children(recursive=True)  # postgres is detached
        assert "gcs_server" in [p.name() for p in own]
        assert not any("ServeController" in " ".join(p.cmdline()) for p in raylet.children(recursive=True))
        _assert_search_works(http_port, key)
        _assert_ray_jobs_work(env, state, tmp_path)
        _assert_listening_on_loopback_only(first, int(env["DTRAG_DASHBOARD_PORT"]))
    finally:
        first.kill()
        first.communicate(timeout=60)
    orphans = _postgres_of(state)
    assert orphans, "kill -9 should have left the embedded PostgreSQL running (nothing to test)"

    # In the short RAY_TMPDIR: HAProxy's socket path must fit in 97 characters.
    second = _start_up({**env, **_haproxy_env(Path(env["RAY_TMPDIR"]) / "haproxy")})
    try:
        key, started = _wait_for_key(second, deadline=time.monotonic() + 240)
        haproxy = _named(second, "haproxy")
        assert haproxy is not None, "no HAProxy runs in front of Serve"
        _assert_search_works(http_port, key)  # the first run's corpus, in the first run's database
        _assert_edge_errors_are_json(http_port, key)
        assert not any(map(alive, orphans))
        assert not any(map(alive, own))  # Ray's agents would hold the metrics port for minutes
        elsewhere = {**env, "DTRAG_HTTP_PORT": str(free_port()), "DTRAG_METRICS_PORT": str(free_port()),
                     "DTRAG_DASHBOARD_PORT": str(free_port())}
        third = subprocess.run([sys.executable, "-m", "cluster.cli.main", "up"], env=elsewhere, text=True,
                               capture_output=True, timeout=120)
        assert third.returncode == 1 and f"in use by dtrag up (pid {second.pid})" in third.stderr
    finally:
        second.send_signal(signal.SIGINT)
        output, _ = second.communicate(timeout=120)
    assert second.returncode == 0, started + output
    assert "left running by an earlier run" in started and "database is empty" not in started
    assert "shutting down" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5)
    _wait_for(lambda: not _postgres_of(state), "the embedded PostgreSQL to stop after Ctrl-C")
    _wait_for(lambda: not alive(haproxy), "HAProxy to stop after Ctrl-C")
    assert alive(gcs)
    socket.create_connection(("127.0.0.1", gcs_port), timeout=5).close()  # the other GCS still answers


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's library mapped (the embedding model is loaded)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _assert_ray_jobs_work(env: dict[str, str], state: Path, tmp_path: Path) -> None:
    """`dtrag jobs submit evaluate` prints what `dtrag eval` prints; Ray's CLI sees the job with the token only."""
    strategies = ["--strategy", "hybrid_rrf", "--strategy", "lexical"]
    dataset = str(sample_corpus_dir())
    evaluated = _dtrag(env, "eval", dataset, *strategies)
    submitted = _dtrag(env, "jobs", "submit", "evaluate", dataset, *strategies, "--no-actions",
                       "--workers", "2", "--shard-size", "15", "--out", str(tmp_path / "evaluation"))
    job_id = submitted.split("submitted ", 1)[1].split(":", 1)[0]
    summary = read_summary(submitted)
    assert summary["status"] == "succeeded" and summary["failed"] == 0 and summary["queries"] == 40
    for row in evaluated.splitlines():  # | strategy | queries | nDCG@10 [interval] | ...
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[0] in ("hybrid_rrf", "lexical"):
            assert f"{summary['ndcg@10'][cells[0]]:.4f}" == cells[2].split(" ")[0], (row, summary)
    assert Path(summary["plot"]).stat().st_size > 0 and Path(summary["per_query"]).is_file()

    ray = [str(Path(sys.executable).with_name("ray")), "job"]
    address = ["--address", f"http://127.0.0.1:{env['DTRAG_DASHBOARD_PORT']}"]
    with_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "ray_auth_token")}
    status = subprocess.run([*ray, "status", job_id, *address], env=with_token, text=True, capture_output=True,
                            timeout=120)
    assert status.returncode == 0 and "succeeded" in status.stdout + status.stderr, status
    logs = subprocess.run([*ray, "logs", job_id, *address], env=with_token, text=True, capture_output=True,
                          timeout=120)
    assert read_summary(logs.stdout)["ndcg@10"] == summary["ndcg@10"]
    refused = subprocess.run([*ray, "list", *address], env={**env, "HOME": str(tmp_path)}, text=True,
                             capture_output=True, timeout=120)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr


def _dtrag(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "cluster.cli.main", *args], env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _assert_listening_on_loopback_only(process: subprocess.Popen, dashboard_port: int) -> None:
    """Every socket `dtrag up`'s Ray listens on, the job server's included, is on 127.0.0.1."""
    listening = [(c.laddr.ip, c.laddr.port) for p in psutil.Process(process.pid).children(recursive=True)
                 for c in _listening(p)]
    assert ("127.0.0.1", dashboard_port) in listening
    assert all(ip.removeprefix("::ffff:").startswith("127.") for ip, _ in listening), listening


def _listening(process: psutil.Process) -> list:
    with contextlib.suppress(psutil.Error):
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    return []


def test_dtrag_up_fails_fast_without_ray_and_stops_its_database(tmp_path: Path, http_port: int):
    state = tmp_path / "state"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli.main", "up", "--no-sample", "--address", f"127.0.0.1:{free_port()}"],
        env=_up_env(state, http_port), text=True, capture_output=True, timeout=180,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing answers at the Ray address" in result.stderr
    assert time.monotonic() - started < 120
    _wait_for(lambda: not _postgres_of(state), "the embedded PostgreSQL to stop after the error")


def test_dtrag_up_refuses_more_connections_than_the_server_accepts(tmp_path: Path, http_port: int):
    """The old service's pool (50 + 100 per process) against PostgreSQL's 100: a clear error
    naming what to lower, before Ray starts, and the database stopped again."""
    state = tmp_path / "state"
    env = {**_up_env(state, http_port), "DB_POOL_SIZE": "50", "DB_MAX_OVERFLOW": "100"}
    result = subprocess.run([sys.executable, "-m", "cluster.cli.main", "up", "--no-sample"], env=env, text=True,
                            capture_output=True, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "max_connections=" in result.stderr and "lower DB_POOL_SIZE + DB_MAX_OVERFLOW" in result.stderr
    assert "Traceback" not in result.stderr and "starting Ray" not in result.stdout
    _wait_for(lambda: not _postgres_of(state), "the embedded PostgreSQL to stop after the error")


def test_serve_deploy_refuses_more_connections_than_the_server_accepts(live_settings, monkeypatch):
    from cluster.platform.connection_budget import ConnectionBudgetExceeded
    from serve_app.app import app_builder

    monkeypatch.setenv("DATABASE_URL", live_settings.database.url)
    monkeypatch.setenv("DTRAG_PIPELINE_REPLICAS", "200")
    with pytest.raises(ConnectionBudgetExceeded, match="DTRAG_PIPELINE_REPLICAS"):
        app_builder({})


@pytest.fixture
def ray_start_cluster() -> Iterator[tuple[int, dict[str, str], psutil.Process, psutil.Process]]:
    """A cluster started with `ray start --head` on loopback, recorded as the machine's latest.

    Its own RAY_TMPDIR (short: Ray's socket paths must fit a Unix socket's name) keeps the
    record away from other Ray users of this machine; stopped by PID, never `ray stop`, which
    would stop every Ray here. Yields its GCS port, environment, GCS and raylet processes.
    """
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--include-dashboard=false", "--num-cpus=1", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(lambda: (temp / "ray" / "ray_current_cluster").exists() and _named(head, "raylet"),
                  "ray start --head to record its cluster", timeout_s=180)
        yield port, env, _named(head, "gcs_server"), _named(head, "raylet")
    finally:
        descendants = psutil.Process(head.pid).children(recursive=True)
        head.terminate()
        head.wait(timeout=60)
        with contextlib.suppress(AssertionError):
            _wait_for(lambda: not any(map(alive, descendants)), "ray start's processes to stop", 30)
        for process in filter(alive, descendants):
            process.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _named(parent: subprocess.Popen, name: str) -> psutil.Process | None:
    return next((p for p in psutil.Process(parent.pid).children(recursive=True) if p.name() == name), None)


def _up_env(state: Path, http_port: int) -> dict[str, str]:
    env = {**os.environ, "DTRAG_STATE_DIR": str(state), "DTRAG_HTTP_PORT": str(http_port),
           "DTRAG_METRICS_PORT": str(free_port()), "DTRAG_DASHBOARD_PORT": str(free_port())}
    for name in ("DATABASE_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def _start_up(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli.main", "up", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _assert_search_works(port: int, key: str) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{port}/api/v1/search/", headers={"X-API-Key": key},
        json={"q": "machine learning", "final_topk": 5}, timeout=30,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["hits"]) == 5


def _haproxy_env(folder: Path) -> dict[str, str]:
    """Ray's HAProxy ingress, with its files and its fixed ports (stats, metrics, the fallback
    proxy) moved where no other cluster on the machine has them."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            **{name: str(free_port()) for name in (
                "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}}


def _assert_edge_errors_are_json(port: int, key: str) -> None:
    """The edge (body limit, request ids, JSON errors) also runs where HAProxy sends requests."""
    response = httpx.post(f"http://127.0.0.1:{port}/api/v1/search/", headers={"X-API-Key": key},
                          content=b"x" * (128 * 1024), timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["request_id"] == response.headers["x-request-id"]
    response = httpx.post(f"http://127.0.0.1:{port}/api/v1/search/", headers={"X-API-Key": key},
                          json={"q": ""}, timeout=30)
    assert response.status_code == 422 and "request_id" in response.json(), response.text


def _postgres_of(state: Path) -> list[psutil.Process]:
    """The postmaster serving `state`'s database and its children (found by command line, not by
    the server's own files)."""
    pgdata = str((state / "pgdata").resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and pgdata in " ".join(process.info["cmdline"] or ()):
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [process, *process.children()]
    return [process for process in found if alive(process)]



def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def _wait_for_key(process: subprocess.Popen, deadline: float) -> tuple[str, str]:
    """The demo key `dtrag up` prints once it serves, and its output up to there."""
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("demo API key"):
            return line.rsplit(" ", 1)[1].strip(), "".join(seen)
    raise AssertionError("dtrag up did not print a key:\n" + "".join(seen))
