"""Helpers the benchmark scripts share: the database and its bench key, a local Ray with Serve,
admin calls, and writing a section of `bench/RESULTS.md`.

Not a benchmark itself. The scripts run as `.venv/bin/python bench/NAME.py`, so `bench/` is on
`sys.path` and they `import _harness`. Nothing here imports Ray at import time: a script must be
able to call `loopback_only_environment()` before Ray is first imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import psutil

from cluster.data.beir import load_qrels, load_queries
from cluster.data.corpus import sample_corpus_dir
from cluster.data.ingest import document_count, ingest
from cluster.platform.api_keys import create_key, revoke_key
from cluster.platform.database import create_pool, resolve_database_url
from cluster.platform.embedded import pgdata_dir, running_postmaster
from cluster.platform.migrate import migrate
from cluster.platform.runtime import deploy, start_ray, start_serve
from cluster.platform.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def local_settings(settings: Settings, http_port: int, metrics_port: int) -> Settings:
    """`settings` for a Ray of our own: Serve on 127.0.0.1:`http_port`, Ray's metrics on `metrics_port`,
    no dashboard (a benchmark submits no jobs, and a `dtrag up` may hold its port)."""
    return dataclasses.replace(
        settings,
        http=dataclasses.replace(settings.http, host="127.0.0.1", port=http_port),
        ray=dataclasses.replace(settings.ray, address=None, metrics_port=metrics_port, dashboard_port=0),
    )


# --- the database -----------------------------------------------------------------------------


async def migrated(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
    finally:
        await connection.close()


EMBEDDING_DIMENSIONS = 384  # documents.embedding is vector(384): MiniLM's


def unit_vectors(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, EMBEDDING_DIMENSIONS) random unit vectors: stand-ins for embeddings where only
    BM25 or the index's cost is measured."""
    vectors = rng.standard_normal((count, EMBEDDING_DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def with_database(url: str, name: str) -> str:
    """The same server's URL with another database name."""
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def scratch_database(url: str, prefix: str) -> Iterator[str]:
    """A new, migrated database on the same server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(url, f'CREATE DATABASE "{name}"'))
    try:
        scratch = with_database(url, name)
        asyncio.run(migrated(scratch))
        yield scratch
    finally:
        asyncio.run(_admin(url, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def prepare_database(settings: Settings, key_name: str) -> str:
    """Migrate, load the sample corpus into an empty database, and return a search + admin key."""
    assert settings.database.url
    await migrated(settings.database.url)  # before the pool: its connections need pgvector's type
    pool = await create_pool(settings.database.url, settings.database)
    try:
        if await document_count(pool) == 0:
            from serve_app.embedding import TextEmbedder

            embedder = TextEmbedder()
            await ingest(pool, sample_corpus_dir(),
                         lambda texts: embedder.encode(texts, settings.embedding.batch_size))
        async with pool.acquire() as connection:
            return await create_key(connection, key_name, ["search", "admin", "name_users"])
    finally:
        await pool.close()


async def revoke(url: str, key: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await revoke_key(connection, key.split("_")[1])
    finally:
        await connection.close()


# --- Ray, Serve and the app -------------------------------------------------------------------


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url/health` until it answers 200; fail if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


@contextlib.contextmanager
def ray_serve(settings: Settings) -> Iterator[str]:
    """A local Ray with Serve's proxy on the configured host and port; yields its URL."""
    from ray import serve

    start_ray(settings.ray)
    try:
        start_serve(settings.http)
        yield f"http://{settings.http.host}:{settings.http.port}"
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


def deploy_app(settings: Settings, url: str, timeout_s: float) -> None:
    """(Re)deploy the DT-RAG app with `settings` and wait until it answers.

    `build_app` starts the cluster's actors, or finds the running ones, in the connected Ray.
    """
    from serve_app.app import APP_NAME, build_app

    deploy(build_app(settings), APP_NAME)
    wait_healthy(url, timeout_s)


def admin(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """An admin API call that must succeed."""
    response = client.request(method, path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


# --- CPU accounting ---------------------------------------------------------------------------


def process_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of one process so far; psutil.Error if it is gone."""
    times = process.cpu_times()
    return times.user + times.system


def process_role(process: psutil.Process) -> str:
    """A readable name for a process of the cluster.

    Ray titles its workers `ray::Class` or `ray::Class.method` while a call runs (`ray::IDLE`
    between tasks), and a Serve replica `ray::ServeReplica:APP:DEPLOYMENT`: the method is dropped,
    so one process keeps one name. The dashboard starts its modules through multiprocessing.
    """
    try:
        cmdline = process.cmdline()
        name = process.name()
    except psutil.Error:
        return "(exited)"
    title = " ".join(cmdline) or name
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    if title.startswith("ray-dashboard-"):  # a dashboard module: `ray-dashboard-JobHead-0`
        return title.split()[0]
    if "postgres" in name:  # the server's own processes by name, client backends as one
        background = ("checkpointer", "background writer", "walwriter", "autovacuum launcher",
                      "logical replication launcher", "io worker", "startup", "archiver")
        return next((f"postgres: {part}" for part in background if part in title), "postgres")
    for known in ("gcs_server", "raylet", "log_monitor", "runtime_env_agent", "monitor.py",
                  "multiprocessing.resource_tracker", "multiprocessing.forkserver", "dashboard/agent.py",
                  "dashboard.py"):
        if known in title:
            return known
    if cmdline[1:2] == ["-m"] and len(cmdline) > 2:
        return cmdline[2]
    script = next((Path(part).name for part in cmdline[1:3] if part.endswith(".py")), None)
    return script or name


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy so far.

    Guest time is already inside user and nice, and steal is time the machine did not get.
    """
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))


# --- reporting --------------------------------------------------------------------------------


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `body` under `heading` in a Markdown file, leaving every other section as it was."""
    lines = path.read_text().splitlines() if path.exists() else []
    new = [heading, "", *body.strip().splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new
    else:
        lines += (["", *new] if lines else new)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it, else its file name."""
    return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else path.name


# --- a cluster under load with learning on (drills, soak, fuzzing) ---------------------------


def learning_on_environment() -> None:
    """Experience replay and the soft-Q bandit on (the `FEATURE_*` defaults every arm starts with),
    unless the caller's environment says otherwise."""
    os.environ.setdefault("FEATURE_EXPERIENCE_REPLAY", "on")
    os.environ.setdefault("FEATURE_SOFT_Q_BANDIT", "on")


@contextlib.contextmanager
def running_cluster(state_dir: Path, http_port: int, metrics_port: int, key_name: str,
                    timeout_s: float = 300.0) -> Iterator[tuple[Settings, str, str]]:
    """The embedded database with the sample corpus, our own Ray, Serve and the app, as `dtrag up`
    starts them; yields (settings, URL, a search + admin key), and stops it all after."""
    base = dataclasses.replace(local_settings(load_settings(), http_port, metrics_port), state_dir=state_dir)
    settings = base.with_database_url(resolve_database_url(None, state_dir))
    assert settings.database.url
    key = asyncio.run(prepare_database(settings, key_name))
    try:
        with ray_serve(settings) as url:
            deploy_app(settings, url, timeout_s)
            yield settings, url, key
    finally:
        asyncio.run(revoke(settings.database.url, key))


def request_deadline_s(settings: Settings) -> float | None:
    """The service's own request deadline (`DTRAG_REQUEST_TIMEOUT_S`: a 504 past it), when it has one."""
    return getattr(settings.http, "request_timeout_s", None)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request under load: when it was sent (seconds since the load began), how long it took."""

    kind: str  # "search" or "feedback"
    sent: float
    seconds: float
    status: int | None  # None: no HTTP answer (the client timed out or lost the connection)
    body: str  # of a non-200 answer, or the client's error; "" for a 200
    search_id: str | None = None  # of a 200 search

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def done(self) -> float:
        return self.sent + self.seconds


@dataclasses.dataclass(frozen=True)
class Judged:
    """The sample corpus's judged queries, with their graded judgements (the feedback a user gives)."""

    queries: list[str]
    judgements: list[dict[str, int]]

    @classmethod
    def sample(cls) -> Judged:
        queries = load_queries(sample_corpus_dir())
        qrels = load_qrels(sample_corpus_dir() / "qrels" / "test.tsv")
        ids = sorted(set(queries) & set(qrels))
        return cls([queries[i] for i in ids], [{doc: int(grade) for doc, grade in qrels[i].items()} for i in ids])


async def learning_load(url: str, key: str, clients: int, stop: asyncio.Event, outcomes: list[Outcome],
                        judged: Judged, began: float, timeout_s: float = 60.0, feedback: bool = True) -> None:
    """`clients` closed-loop clients until `stop` (an asyncio.Event) is set: each searches a judged
    query, and when that is answered, sends its judgements as feedback, so the policy learns
    (with `feedback=False`, only the searches: a load on the search path alone).

    Every request lands in `outcomes` as it completes, so a caller can watch the load live;
    `began` is the `time.monotonic()` its `sent` times count from.
    """
    turns = itertools.count()  # shared: clients take turns through the queries

    async def timed(kind: str, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Outcome:
        sent = time.monotonic()
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as error:
            return Outcome(kind, sent - began, time.monotonic() - sent, None, f"{type(error).__name__}: {error}")
        status, seconds = response.status_code, time.monotonic() - sent
        if status != 200:
            return Outcome(kind, sent - began, seconds, status, response.text)
        return Outcome(kind, sent - began, seconds, status, "",
                       response.json().get("search_id") if kind == "search" else None)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            i = next(turns) % len(judged.queries)
            search = await timed("search", client, "/api/v1/search/", {"q": judged.queries[i], "final_topk": 10})
            outcomes.append(search)
            if search.search_id and feedback:
                outcomes.append(await timed("feedback", client, "/api/v1/feedback",
                                            {"search_id": search.search_id, "judgements": judged.judgements[i]}))

    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))


# Driver and Ray exception names a client must never see (the error bodies' contract).
_LEAKS = ("Traceback", "pid=", "\x1b", "asyncpg", "psycopg", "InterfaceError", "PostgresError",
          "ConnectionDoesNotExistError", "CannotConnectNowError", "RayActorError", "ActorDiedError",
          "RayTaskError", "ActorUnavailableError")


def body_problem(outcome: Outcome) -> str | None:
    """What is wrong with a non-200 answer's body: not the documented JSON error, or internals in it."""
    if outcome.status is None:
        return None  # no body: counted as a client-side failure instead
    try:
        body = json.loads(outcome.body)
    except ValueError:
        return f"HTTP {outcome.status}: not JSON: {outcome.body[:120]!r}"
    if not isinstance(body, dict) or not {"error", "message", "request_id"} <= body.keys():
        return f"HTTP {outcome.status}: not the documented error body: {outcome.body[:120]!r}"
    leaked = [word for word in _LEAKS if word in outcome.body]
    return f"HTTP {outcome.status}: contains {leaked}: {outcome.body[:120]!r}" if leaked else None


def percentiles_ms(seconds: Any) -> tuple[float, float, float]:
    """p50, p95 and max in milliseconds (NaN for none)."""
    values = np.asarray(seconds, dtype=float) * 1000
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    return float(np.percentile(values, 50)), float(np.percentile(values, 95)), float(values.max())


# --- the cluster's processes ------------------------------------------------------------------


def cluster_processes(state_dir: Path | None, root: psutil.Process | None = None,
                      root_role: str = "driver + load generator") -> dict[int, str]:
    """Every process of the cluster, pid -> `process_role`: `root` (this process by default) and
    its descendants (Ray's own processes and workers), and, given the state folder, the embedded
    PostgreSQL with its backends (not a descendant: the server daemonizes)."""
    root = root or psutil.Process()
    roles = {root.pid: root_role}
    postmaster = None if state_dir is None else running_postmaster(pgdata_dir(state_dir))
    others = [] if postmaster is None else [postmaster, *postmaster.children()]
    for process in [*root.children(recursive=True), *others]:
        with contextlib.suppress(psutil.Error):
            roles[process.pid] = process_role(process)
    return roles


def rss_by_role(roles: dict[int, str]) -> dict[str, int]:
    """Resident bytes per role, summed over its processes (gone ones are skipped)."""
    totals: dict[str, int] = {}
    for pid, role in roles.items():
        with contextlib.suppress(psutil.Error):
            totals[role] = totals.get(role, 0) + psutil.Process(pid).memory_info().rss
    return totals


async def experiences_recorded(url: str, search_ids: list[str], settle_s: float = 15.0) -> int:
    """How many of `search_ids` have their row in `experiences`, once the experience logs have
    flushed (the count stops growing, or all are there, or `settle_s` passes)."""
    connection = await asyncpg.connect(url)
    try:
        deadline, last = time.monotonic() + settle_s, -1
        while True:
            found = await connection.fetchval(
                "SELECT count(*) FROM experiences WHERE search_id = ANY($1::text[])", search_ids)
            if found == len(search_ids) or found == last or time.monotonic() > deadline:
                return found
            last = found
            await asyncio.sleep(2.0)
    finally:
        await connection.close()


class OtherWork:
    """The share of the machine's cores that processes outside `roles` used from construction to
    `share()`: well above 0 means the cores were shared and the timings are pessimistic."""

    def __init__(self, roles: dict[int, str]):
        self._pids = list(roles)
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        ours = 0.0
        for pid in self._pids:
            with contextlib.suppress(psutil.Error):
                ours += process_cpu_seconds(psutil.Process(pid))
        return time.monotonic(), machine_busy_seconds(), ours

    def share(self) -> float:
        (t0, machine0, ours0), (t1, machine1, ours1) = self._start, self._read()
        return max(0.0, (machine1 - machine0) - (ours1 - ours0)) / ((t1 - t0) * psutil.cpu_count())
