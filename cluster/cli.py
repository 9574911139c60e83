"""`dtrag`: bring the cluster up, migrate, ingest, manage keys, evaluate."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import asyncpg

from cluster import __version__, operate
from cluster.api_keys import SCOPES, ApiKeyVerifier, create_key, list_keys, revoke_key
from cluster.database import DatabaseUnavailable, create_pool, redact, resolve_database_url
from cluster.errors import ServiceUnavailable
from cluster.log import configure_logging
from cluster.runtime import loopback_only_environment
from cluster.migrate import MigrationError, migrate, migration_status
from cluster.settings import STRATEGIES, Settings, SettingsError, load_settings

DEMO_KEY_FILE = "demo-key"


def sample_corpus_dir() -> Path:
    """The small collection shipped with the package, served when the database is empty."""
    return Path(str(resources.files("cluster").joinpath("sample_corpus")))


def _database(settings: Settings) -> Settings:
    """Settings pointing at a live database (the embedded one is started if none is set)."""
    return settings.with_database_url(resolve_database_url(settings.database.url, settings.state_dir))


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact(url)}: {error}; check DATABASE_URL"
        ) from error


async def _migrate(url: str) -> list[str]:
    connection = await _connect(url)
    try:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(connection)]
    finally:
        await connection.close()


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    async def status(url: str) -> None:
        connection = await _connect(url)
        try:
            for entry in await migration_status(connection):
                applied = entry.applied_at.isoformat(timespec="seconds") if entry.applied_at else "pending"
                print(f"{entry.migration.version:04d}_{entry.migration.name:<24} {applied}")
        finally:
            await connection.close()

    live = _database(settings)
    url = live.database.url
    assert url
    if args.db_command == "migrate":
        applied = asyncio.run(_migrate(url))
        print(f"applied {', '.join(applied)}" if applied else "database is up to date")
    else:
        asyncio.run(status(url))
    return 0


@functools.cache
def _embedder():
    from serve_app.embedding import TextEmbedder

    return TextEmbedder()


async def _ingest(settings: Settings, path: Path, show_progress: bool = True):
    from cluster.ingest import ingest

    assert settings.database.url
    await _migrate(settings.database.url)
    pool = await create_pool(settings.database.url, settings.database)
    try:
        # The model loads on the first changed document: a re-run of unchanged data skips it.
        return await ingest(
            pool, path, lambda texts: _embedder().encode(texts, settings.embedding.batch_size),
            show_progress=show_progress,
        )
    finally:
        await pool.close()


def _print_ingest_report(report) -> None:
    for error in report.errors[:50]:
        print(f"  line {error.line}: {error.reason}", file=sys.stderr)
    if len(report.errors) > 50:
        print(f"  ... and {len(report.errors) - 50} more malformed lines", file=sys.stderr)
    print(
        f"read {report.read} documents: {report.inserted} inserted, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} malformed lines skipped; "
        f"{report.seconds:.1f} s, {report.docs_per_second:.1f} docs/s"
    )


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    live = _database(settings)
    report = asyncio.run(_ingest(live, Path(args.path)))
    _print_ingest_report(report)
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def run(url: str) -> int:
        connection = await _connect(url)
        try:
            await migrate(connection)
            if args.keys_command == "create":
                key = await create_key(connection, args.name, args.scope or ["search"])
                print(key)
            elif args.keys_command == "list":
                for info in await list_keys(connection):
                    state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "active"
                    print(f"{info.key_id}  {info.name:<20} {','.join(info.scopes):<14} {state}")
            elif not await revoke_key(connection, args.key_id):
                print(f"no active key with id {args.key_id}", file=sys.stderr)
                return 1
            return 0
        finally:
            await connection.close()

    live = _database(settings)
    assert live.database.url
    try:
        return asyncio.run(run(live.database.url))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


async def _demo_key(settings: Settings) -> str:
    """The key printed by `dtrag up`, kept in the state folder (only its hash is in the database)."""
    assert settings.database.url
    path = settings.state_dir / DEMO_KEY_FILE
    pool = await create_pool(settings.database.url, settings.database)
    try:
        if path.is_file():
            token = path.read_text().strip()
            if await ApiKeyVerifier(pool, 0).verify(token):
                return token
        async with pool.acquire() as connection:
            token = await create_key(connection, "demo", ["search", "admin"])
    finally:
        await pool.close()
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


async def _prepare(settings: Settings, load_sample: bool) -> str:
    from cluster.ingest import document_count

    assert settings.database.url
    await _migrate(settings.database.url)
    pool = await create_pool(settings.database.url, settings.database)
    try:
        empty = await document_count(pool) == 0
    finally:
        await pool.close()
    if empty and load_sample:
        print(f"database is empty: loading the sample corpus ({sample_corpus_dir()})")
        _print_ingest_report(await _ingest(settings, sample_corpus_dir()))
    return await _demo_key(settings)


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stop:
        time.sleep(0.2)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from ray import serve

    from cluster.runtime import deploy, start_ray, start_serve
    from serve_app.app import APP_NAME, build_app

    address = args.address or settings.ray.address
    live = _database(settings)
    key = asyncio.run(_prepare(live, load_sample=not args.no_sample))
    print("starting Ray and the Serve application ...", flush=True)
    start_ray(live.ray, address)
    try:
        start_serve(live.http)
        deploy(build_app(live), APP_NAME)
        url = f"http://{live.http.host}:{live.http.port}"
        print(
            f"\nDT-RAG is serving at {url}  (API docs: {url}/docs)\n"
            f"demo API key (search, admin): {key}\n\n"
            f"  curl -s -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"q\":\"machine learning\",\"final_topk\":5}}' {url}/api/v1/search/\n\n"
            "Ctrl-C stops the service.",
            flush=True,
        )
        _wait_for_stop()
        print("shutting down ...", flush=True)
    finally:
        import ray

        if address:
            serve.delete(APP_NAME)  # leave a shared cluster as we found it
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _service(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """The running service's URL and an API key: flags, else DTRAG_API_KEY, else the demo key."""
    url = args.url or f"http://{settings.http.host}:{settings.http.port}"
    key = args.api_key or os.environ.get("DTRAG_API_KEY") or _stored_demo_key(settings)
    if not key:
        raise ValueError("no API key: pass --api-key or set DTRAG_API_KEY")
    return url, key


def add_service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="service URL (default: the configured host and port)")
    parser.add_argument("--api-key", default=None, help="default: DTRAG_API_KEY or the demo key")


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.evaluate import evaluate_dataset, format_table

    url, key = _service(args, settings)
    strategies = args.strategy or list(STRATEGIES)
    results = evaluate_dataset(
        Path(args.dataset), url, key, strategies, concurrency=args.concurrency, json_path=args.json
    )
    print(format_table(results))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.train import TrainingError, format_report, plot_learning_curve, train_dataset

    url, key = _service(args, settings)
    dataset = Path(args.dataset)
    plot = args.plot or Path("bench/results") / f"learning_curve_{dataset.resolve().name}.png"
    try:
        report = train_dataset(
            dataset, url, key, epochs=args.epochs, concurrency=args.concurrency, seed=args.seed,
            json_path=args.json,
        )
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    plot_learning_curve(report, plot)
    print(f"\nlearning curve: {plot}")
    return 0


def _stored_demo_key(settings: Settings) -> str | None:
    path = settings.state_dir / DEMO_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def cmd_operate(args: argparse.Namespace, settings: Settings) -> int:
    """`flags` and `rollout`: one admin API call each, answered as a short report."""
    url, key = _service(args, settings)
    print(args.operation(args, url, key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrag", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dtrag {__version__}")
    parser.add_argument("--env-file", type=Path, help="read KEY=value settings from this file first")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start Ray, the database and the Serve app; Ctrl-C stops")
    up.add_argument("--address", help="an existing Ray cluster (e.g. ray://host:10001 or auto)")
    up.add_argument("--no-sample", action="store_true", help="do not load the sample corpus")
    up.set_defaults(handler=cmd_up)

    db = commands.add_parser("db", help="schema migrations")
    db.add_argument("db_command", choices=["migrate", "status"])
    db.set_defaults(handler=cmd_db)

    ingest = commands.add_parser("ingest", help="load a BEIR folder or a JSONL file of documents")
    ingest.add_argument("path", help="a BEIR folder (corpus.jsonl[.gz]) or a .jsonl[.gz] file")
    ingest.set_defaults(handler=cmd_ingest)

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", default="default", help="a label for the key")
    create.add_argument("--scope", action="append", choices=SCOPES, help="repeat for several")
    key_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(handler=cmd_keys)

    evaluate = commands.add_parser("eval", help="nDCG@10, P@5, R@100 of a BEIR dataset's test queries")
    evaluate.add_argument("dataset", help="BEIR folder with queries.jsonl and qrels/test.tsv")
    evaluate.add_argument("--strategy", action="append", choices=STRATEGIES, help="default: all")
    add_service_options(evaluate)
    evaluate.add_argument("--concurrency", type=int, default=4)
    evaluate.add_argument("--json", type=Path, help="also write per-query results here")
    evaluate.set_defaults(handler=cmd_eval)

    train = commands.add_parser(
        "train", help="teach the bandit with a simulated user on training queries, score it on test queries"
    )
    train.add_argument("dataset", help="BEIR folder; extra/queries_all.jsonl + extra/qrels_train.tsv "
                       "train when present, else half of the judged test queries")
    train.add_argument("--epochs", type=int, default=3, help="passes over the training queries")
    add_service_options(train)  # the key needs the search and admin scopes
    train.add_argument("--concurrency", type=int, default=4)
    train.add_argument("--plot", type=Path, help="learning curve PNG "
                       "(default: bench/results/learning_curve_<dataset>.png)")
    train.add_argument("--json", type=Path, help="also write scores, curve, Q-table, per-query results")
    train.add_argument("--seed", type=int, default=0, help="query order; without training qrels, the split")
    train.set_defaults(handler=cmd_train)

    operate.add_commands(commands, add_service_options, cmd_operate)
    return parser


def main(argv: list[str] | None = None) -> int:
    loopback_only_environment()  # before anything imports ray, which reads it at import
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
    except SettingsError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return args.handler(args, settings)
    except (ServiceUnavailable, MigrationError, SettingsError, FileNotFoundError, ValueError,
            operate.OperationFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
