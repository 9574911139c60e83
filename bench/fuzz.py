"""OpenAPI fuzzing: schemathesis against the running service's `/openapi.json` with a valid key.

The cluster is started the way `dtrag up` starts it (embedded PostgreSQL with the sample corpus,
our own loopback Ray on 127.0.0.1:8600, Serve, the app). Schemathesis generates requests for
every operation from the published schema, valid and invalid (`--mode all`: its examples,
coverage and fuzzing phases), with a search + admin key, and checks each answer: no 5xx, a
documented status code and content type, and a body matching the documented schema. Target:
at least `--min-cases` (1,000) cases and no failure.

    .venv/bin/python bench/fuzz.py [--max-examples 100] [--state-dir /tmp/fuzz-state]

It prints schemathesis's own report, writes its JSON report to `bench/results/fuzz/` and the
section "## OpenAPI fuzzing (schemathesis)" of `bench/RESULTS.md`, and exits 1 on any failure.
"""

from __future__ import annotations

from cluster.platform.runtime import loopback_only_environment

loopback_only_environment()  # before anything imports ray, or Ray binds the machine's address

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from _harness import BENCH, relative, replace_section, running_cluster  # noqa: E402

SECTION = "## OpenAPI fuzzing (schemathesis)"
HTTP_PORT = 8600
METRICS_PORT = 9600
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100, help="generated cases per operation and phase")
    parser.add_argument("--min-cases", type=int, default=1000, help="fewer generated cases than this fails the run")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/fuzz-state"),
                        help="DTRAG_STATE_DIR of the embedded database (sample corpus loaded if empty)")
    parser.add_argument("--report-dir", type=Path, default=BENCH / "results" / "fuzz")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    return parser.parse_args(argv)


def schemathesis(url: str, key: str, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run the schemathesis CLI against `url`; returns its JSON report and its printed output."""
    args.report_dir.mkdir(parents=True, exist_ok=True)
    report = args.report_dir / "report.json"
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
               "--header", f"X-API-Key: {key}", "--checks", CHECKS, "--max-examples", str(args.max_examples),
               "--seed", str(args.seed), "--workers", "2", "--request-timeout", "60", "--continue-on-failure",
               "--report", "json", "--report-json-path", report.name, "--no-color"]
    # run in the report's folder: the report records its command, and a relative path says no more than needed
    run = subprocess.run(command, check=False, capture_output=True, text=True, cwd=args.report_dir)  # exit code: in the report
    print(run.stdout, run.stderr, sep="\n")
    return json.loads(report.read_text()), run.stdout


def failure_details(output: str) -> str:
    """Each failing case as schemathesis printed it: the operation, what was received against what
    is documented, the body, and the request (its key filtered)."""
    start, end = output.find("FAILURES"), output.find("SUMMARY")
    if start < 0:
        return ""
    keep = ("___", "- ST", "Received:", "Documented:", "[", "`{", "curl ")
    lines = [line.strip() for line in output[start:end].splitlines() if line.strip().startswith(keep)]
    return "```\n" + "\n".join(line[:300] for line in lines) + "\n```"


def section_body(report: dict[str, Any], output: str, passed: bool, args: argparse.Namespace) -> str:
    command = shlex.join([".venv/bin/python", "bench/fuzz.py", *sys.argv[1:]])
    cases, operations = report["test_cases"], report["operations"]
    return f"""
Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. schemathesis {report['schemathesis_version']}.
Result: **{'pass' if passed else 'FAIL'}**.

```
{command}
```

Every operation of the service's `/openapi.json`, with a search + admin + name_users key, valid and
invalid requests (`--mode all`), phases {', '.join(p for p, s in report['phases'].items() if s['status'] != 'skip')},
checks `{CHECKS}`, seed {args.seed}, {report['running_time']:.0f} s.

| operations tested | cases generated | with failures | unique failures | errored |
|---:|---:|---:|---:|---:|
| {operations['tested']} of {operations['selected']} | {cases['generated']} | {cases['with_failures']} | {cases['unique_failures']} | {cases['errored']} |

{chr(10).join(f"- {f['code']} {f['title']}: {f['count']} cases, in {', '.join(f['operations'])}"
             for f in report['failures']) or 'No failures.'}

{failure_details(output)}

Report: `{relative(args.report_dir / 'report.json')}`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with running_cluster(args.state_dir, HTTP_PORT, METRICS_PORT, "bench-fuzz") as (_, url, key):
        report, output = schemathesis(url, key, args)
    cases = report["test_cases"]
    passed = report["exit_code"] == 0 and cases["generated"] >= args.min_cases
    print(f"{cases['generated']} cases, {cases['with_failures']} with failures: {'pass' if passed else 'FAIL'}")
    replace_section(args.results, SECTION, section_body(report, output, passed, args))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
