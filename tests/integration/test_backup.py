"""`dtrag backup` and `dtrag restore` with the real client programs against real databases.

The tests are synchronous, as the commands run their own event loops."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from cluster.cli.main import main as dtrag
from cluster.data.ingest import ingest
from cluster.platform.api_keys import ApiKeyVerifier, create_key
from cluster.platform.database import create_pool
from cluster.platform.embedded import bin_dir, pgdata_dir, running_postmaster
from cluster.platform.migrate import migrate
from conftest import temporary_database

pytestmark = pytest.mark.integration

# Every relation that holds rows, tables and materialized views alike, whatever migrations add.
_RELATIONS = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname = 'public' ORDER BY 1
"""


@pytest.fixture
async def empty_database_url(live_settings) -> AsyncIterator[str]:
    """A second empty database on the session server (the restore target)."""
    async with temporary_database(live_settings.database.url, "restore") as url:
        yield url


@pytest.fixture
def packaged_clients_first(monkeypatch):
    """The embedded package's client programs first on PATH, as the README tells operators whose
    system `pg_dump` is older than the server."""
    monkeypatch.setenv("PATH", f"{bin_dir()}{os.pathsep}{os.environ['PATH']}")


async def _populate(url: str, live_settings, embedder, tmp_path: Path) -> str:
    """Known rows in every kind of table: documents, a key, an experience, a checkpoint, rollout state."""
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        key = await create_key(connection, "restored-bot", ["search", "admin"])
        await connection.execute(
            "INSERT INTO experiences (search_id, arm, state_key, action, strategy, propensity, "
            "policy_version, served_doc_ids, reward, feedback) "
            "VALUES ('s-1', 'control', 'short', 2, 'hybrid_rrf', 0.5, 3, '{d1,d2}', 0.75, $1)",
            json.dumps({"clicked": ["d1"]}),
        )
        await connection.execute(
            "INSERT INTO q_table_snapshots (policy_version, actions, q_table, replay_state, stats) "
            "VALUES (3, '{lexical,dense}', $1, '\\x00ff10'::bytea, '{}')", json.dumps({"short": [0.1, 0.2]}),
        )
        await connection.execute("INSERT INTO rollout_state (state) VALUES ($1)",
                                 json.dumps({"stage": 2, "weight": 0.25}))
    finally:
        await connection.close()
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(
        json.dumps({"_id": f"d{i}", "title": f"Title {i}", "text": f"tides and the moon, note {i}"}) + "\n"
        for i in range(1, 6)
    ))
    pool = await create_pool(url, live_settings.database)
    try:
        await ingest(pool, corpus, embedder.encode, show_progress=False)
    finally:
        await pool.close()
    return key


async def _contents(url: str) -> dict[str, tuple[int, str]]:
    """Row count and a digest of every row, per relation."""
    connection = await asyncpg.connect(url)
    try:
        relations = [row[0] for row in await connection.fetch(_RELATIONS)]
        return {
            name: tuple(await connection.fetchrow(
                f'SELECT count(*), md5(coalesce(string_agg(t::text, \'|\' ORDER BY t::text), \'\')) '
                f'FROM "{name}" t'))
            for name in relations
        }
    finally:
        await connection.close()


async def _execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _key_works(url: str, key: str, live_settings) -> bool:
    pool = await create_pool(url, live_settings.database)
    try:
        return await ApiKeyVerifier(pool, 0).verify(key) is not None
    finally:
        await pool.close()


def test_backup_restores_every_table_into_a_fresh_database(
        fresh_database_url, empty_database_url, live_settings, embedder, packaged_clients_first,
        monkeypatch, tmp_path: Path, capsys):
    key = asyncio.run(_populate(fresh_database_url, live_settings, embedder, tmp_path))
    archive = tmp_path / "dtrag.dump"

    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    assert dtrag(["backup", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "pg_dump (PostgreSQL)" in out and "backup written" in out
    assert "  public.documents" in out and "  public.experiences" in out  # progress, table by table
    assert not (tmp_path / "dtrag.dump.partial").exists()
    assert dtrag(["backup", str(archive)]) == 1
    assert "never overwrites" in capsys.readouterr().err

    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    assert dtrag(["restore", str(archive)]) == 0
    assert "restored" in capsys.readouterr().out
    source = asyncio.run(_contents(fresh_database_url))
    assert {"documents", "postings", "api_keys", "experiences", "q_table_snapshots", "rollout_state",
            "schema_migrations", "lexeme_stats", "corpus_stats"} <= set(source)
    assert source["documents"][0] == 5 and source["experiences"][0] == 1
    assert asyncio.run(_contents(empty_database_url)) == source
    assert asyncio.run(_key_works(empty_database_url, key, live_settings))

    # A second restore into the now full database is refused, and changes nothing.
    assert dtrag(["restore", str(archive)]) == 1
    err = capsys.readouterr().err
    assert "is not empty" in err and "--clean" in err
    # --clean brings the database back to the backup's state, whatever was written since.
    asyncio.run(_execute(empty_database_url, "DELETE FROM api_keys", "UPDATE rollout_state SET state = '{}'"))
    assert dtrag(["restore", "--clean", str(archive)]) == 0
    assert asyncio.run(_contents(empty_database_url)) == source


def test_restore_rejects_what_is_not_an_archive(empty_database_url, packaged_clients_first,
                                                      monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("DATABASE_URL", empty_database_url)
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an archive")
    assert dtrag(["restore", str(bogus)]) == 1
    assert "is not a pg_dump archive" in capsys.readouterr().err
    assert dtrag(["restore", str(tmp_path / "missing.dump")]) == 1
    assert "no such backup" in capsys.readouterr().err
    assert asyncio.run(_contents(empty_database_url)) == {}


def test_restore_into_the_embedded_server_starts_and_stops_it(
        fresh_database_url, live_settings, embedder, packaged_clients_first, monkeypatch,
        tmp_path: Path, capsys):
    """Without `dtrag up` running, restore starts the state folder's server, loads, stops it."""
    key = asyncio.run(_populate(fresh_database_url, live_settings, embedder, tmp_path))
    archive = tmp_path / "dtrag.dump"
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    assert dtrag(["backup", str(archive)]) == 0

    state = tmp_path / "state"
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DTRAG_STATE_DIR", str(state))
    assert dtrag(["restore", str(archive)]) == 0
    assert "restored" in capsys.readouterr().out
    assert running_postmaster(pgdata_dir(state)) is None

    # Backing the embedded database up (started for the command, then stopped) gives the same rows.
    again = tmp_path / "again.dump"
    assert dtrag(["backup", str(again)]) == 0
    assert running_postmaster(pgdata_dir(state)) is None
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    assert dtrag(["restore", "--clean", str(again)]) == 0
    assert asyncio.run(_key_works(fresh_database_url, key, live_settings))
