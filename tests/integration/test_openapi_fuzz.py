"""Schemathesis against the real Serve app's `/openapi.json`: generated requests, valid and
invalid, get no 5xx and only documented answers (status, content type, body schema).

A suite-sized run; `bench/fuzz.py` runs 1,000+ cases and records them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MIN_CASES = 150


async def test_generated_requests_get_documented_answers(live_settings, deployed, tmp_path):
    async with deployed(live_settings, "openapi-fuzz") as client:
        report = tmp_path / "report.json"
        command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{str(client.base_url).rstrip('/')}/openapi.json",
                   "--header", f"X-API-Key: {client.headers['X-API-Key']}", "--checks", CHECKS,
                   "--max-examples", "5", "--seed", "1", "--workers", "2", "--continue-on-failure",
                   # ENVIRONMENT=test obeys the fault switch: a fault is a 500 on purpose
                   "--exclude-path", "/api/v1/admin/faults",
                   "--report", "json", "--report-json-path", str(report), "--no-color"]
        run = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300,
                                         cwd=tmp_path)  # its cache goes there too
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    outcome = json.loads(report.read_text())
    assert outcome["failures"] == [] and outcome["exit_code"] == 0, run.stdout[-6000:]
    assert outcome["test_cases"]["generated"] >= MIN_CASES, outcome["test_cases"]
