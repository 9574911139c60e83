"""PostgreSQL's client programs as subprocesses: `pg_dump` and `pg_restore` in the custom format.

The only module that runs them. The password never goes on a command line (other users of
the machine can read those); it travels in the child's environment instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cluster.platform.errors import ServiceUnavailable

# The per-table lines of `--verbose`, the progress worth showing.
_TABLE_LINE = re.compile(r'(?:dumping contents of|processing data for) table "?([^"\s]+)"?')
_PROBLEM_LINE = re.compile(r"error|fatal|warning|detail|hint", re.IGNORECASE)


class PgToolError(ServiceUnavailable):
    """A client program is missing or failed; the message carries its own explanation."""


def program(name: str, bin_dir: Path | None) -> str:
    """`name` from `bin_dir`, else from PATH (for an external server)."""
    found = str(bin_dir / name) if bin_dir else shutil.which(name)
    if not found or not os.access(found, os.X_OK):
        raise PgToolError(
            f"{name} not found {f'in {bin_dir}' if bin_dir else 'on PATH'}: install PostgreSQL's client "
            "programs, the server's major version or newer, and put them first on PATH"
        )
    return found


def version(executable: str) -> str:
    return subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def dump(url: str, path: Path, bin_dir: Path | None, progress: Callable[[str], None]) -> None:
    """The whole database at `url` into `path` (custom format), written whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    try:
        _run([program("pg_dump", bin_dir), "--format=custom", "--verbose", f"--file={partial}"], url,
             progress)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def archive_tables(path: Path, bin_dir: Path | None) -> list[str]:
    """The tables whose rows the archive holds; fails if `path` is no custom-format archive."""
    result = subprocess.run([program("pg_restore", bin_dir), "--list", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise PgToolError(f"{path} is not a pg_dump archive: {result.stderr.strip()}")
    return [line.split()[-2] for line in result.stdout.splitlines()
            if not line.startswith(";") and " TABLE DATA " in line]


def restore(url: str, path: Path, bin_dir: Path | None, clean: bool, progress: Callable[[str], None]) -> None:
    """Load the archive into `url` in one transaction: on any error the target is left unchanged.

    Objects are owned by the connecting user (`--no-owner`), so an archive of the embedded
    server restores into an external one and back. `clean` drops the archive's objects first.
    """
    command = [program("pg_restore", bin_dir), "--verbose", "--single-transaction", "--exit-on-error",
               "--no-owner", "--no-privileges"]
    if clean:
        command += ["--clean", "--if-exists"]
    _run(command + [str(path)], url, progress)


def _run(command: list[str], url: str, progress: Callable[[str], None]) -> None:
    """Run a client program against `url`, report each table it reaches, raise with its errors."""
    dbname, env = _connection(url)
    errors: list[str] = []
    with subprocess.Popen([*command, f"--dbname={dbname}"], env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if table := _TABLE_LINE.search(line):
                progress(table.group(1))
            elif _PROBLEM_LINE.search(line):
                errors.append(line.strip())
    if process.returncode != 0:
        name = Path(command[0]).name
        raise PgToolError(f"{name} failed (exit {process.returncode}): " + " | ".join(errors[-5:]))


def _connection(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and an environment that carries the password instead."""
    parts = urlsplit(url)
    env = dict(os.environ)
    if not parts.password:
        return url, env
    env["PGPASSWORD"] = parts.password
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}")), env
