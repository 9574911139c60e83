"""`dtrag` commands against the session's embedded database, and `dtrag up` as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.cli.main import main as dtrag

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


def test_dtrag_up_serves_search_and_stops_cleanly(tmp_path: Path, http_port: int):
    """The quick start as a user runs it: a fresh state folder, the sample corpus, Ctrl-C."""
    port = http_port
    env = {**os.environ, "DTRAG_STATE_DIR": str(tmp_path / "state"), "DTRAG_HTTP_PORT": str(port)}
    env.pop("DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli.main", "up"], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        key = _wait_for_key(process, deadline=time.monotonic() + 240)
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/search/", headers={"X-API-Key": key},
            json={"q": "machine learning", "final_topk": 5}, timeout=30,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["hits"]) == 5
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "shutting down" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def _wait_for_key(process: subprocess.Popen, deadline: float) -> str:
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("demo API key"):
            return line.rsplit(" ", 1)[1].strip()
    raise AssertionError("dtrag up did not print a key:\n" + "".join(seen))

