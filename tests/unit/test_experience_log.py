"""The experience log holds a batch while the database is away, and drops only what it refuses."""

import asyncpg
import pytest

from cluster.platform.database import DatabaseUnavailable, unavailable_on_connection_errors
from serve_app.experience_log import ExperienceLog, ServedSearch


class FlakyPool:
    """A table keyed by search id, as PostgreSQL keeps it: COPY fails with the given errors first
    (an error marked `committed` stores the rows first, as a COPY whose acknowledgement was lost),
    refuses duplicate ids, and an INSERT ... ON CONFLICT DO NOTHING skips them; `bad` ids are refused."""

    def __init__(self, *errors: Exception, bad: tuple[str, ...] = ()):
        self.errors = list(errors)
        self.bad = bad
        self.stored: dict[str, tuple] = {}

    @property
    def rows(self) -> list[tuple]:
        return list(self.stored.values())

    async def copy_records_to_table(self, table: str, *, records, columns) -> None:
        if self.errors:
            error = self.errors.pop(0)
            if getattr(error, "committed", False):
                self.stored.update((row[0], row) for row in records)
            raise error
        if any(row[0] in self.stored for row in records):
            raise asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
        if any(row[0] in self.bad for row in records):
            raise asyncpg.CharacterNotInRepertoireError("invalid byte sequence")
        self.stored.update((row[0], row) for row in records)

    async def execute(self, query: str, *row) -> None:
        assert "ON CONFLICT (search_id) DO NOTHING" in query
        if row[0] in self.bad:
            raise asyncpg.CharacterNotInRepertoireError("invalid byte sequence")
        self.stored.setdefault(row[0], row)


def served(search_id: str) -> ServedSearch:
    return ServedSearch(search_id, "control", None, "s", "q", 5, [0.0], 0, "hybrid@0.5", 1.0, 1, ["d1"], [1.0],
                        "extractive", 1.0, 1.0, None, None, None, None, None)


@pytest.mark.parametrize("error", [
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    FileNotFoundError(2, "No such file or directory"),  # the Unix socket is gone
])
async def test_a_stopping_or_stopped_server_is_unavailable_not_an_error(error):
    with pytest.raises(DatabaseUnavailable):
        async with unavailable_on_connection_errors("lexical retrieval"):
            raise error


async def test_a_batch_waits_for_the_database_and_is_written_once():
    pool = FlakyPool(asyncpg.AdminShutdownError("terminating"), FileNotFoundError(2, "gone"))
    log = ExperienceLog(pool, capacity=10, flush_interval_s=0.001)
    await log._write([served("a"), served("b")])
    assert [row[0] for row in pool.rows] == ["a", "b"] and log.dropped == 0


async def test_only_the_rows_the_database_refuses_are_dropped_and_counted():
    pool = FlakyPool(bad=("b",))
    log = ExperienceLog(pool, capacity=10, flush_interval_s=0.001)
    await log._write([served("a"), served("b"), served("c")])
    assert [row[0] for row in pool.rows] == ["a", "c"] and log.dropped == 1


async def test_a_copy_that_committed_before_its_connection_died_is_not_written_twice_nor_dropped():
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    lost.committed = True
    pool = FlakyPool(lost)
    log = ExperienceLog(pool, capacity=10, flush_interval_s=0.001)
    await log._write([served("a"), served("b")])
    assert [row[0] for row in pool.rows] == ["a", "b"] and log.dropped == 0
