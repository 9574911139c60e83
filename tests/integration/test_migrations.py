import asyncpg
import pytest

from cluster.platform.migrate import MigrationError, available_migrations, migrate, migration_status

pytestmark = pytest.mark.integration


async def test_migrate_applies_in_order_once_and_records(fresh_database_url: str):
    connection = await asyncpg.connect(fresh_database_url)
    try:
        assert all(s.applied_at is None for s in await migration_status(connection))
        applied = await migrate(connection)
        assert [m.version for m in applied] == [m.version for m in available_migrations()]
        assert await migrate(connection) == []
        assert all(s.applied_at is not None for s in await migration_status(connection))
        tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
        assert {"documents", "postings", "api_keys", "schema_migrations"} <= tables
        index = await connection.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'documents_embedding_idx'"
        )
        assert "hnsw" in index and "vector_cosine_ops" in index
    finally:
        await connection.close()


async def test_edited_or_unknown_migrations_are_refused(fresh_database_url: str):
    connection = await asyncpg.connect(fresh_database_url)
    try:
        await migrate(connection)
        await connection.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(connection)
        await connection.execute("DELETE FROM schema_migrations WHERE version = 1")
        await connection.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'y')"
        )
        with pytest.raises(MigrationError, match="upgrade dtrag"):
            await migration_status(connection)
    finally:
        await connection.close()
