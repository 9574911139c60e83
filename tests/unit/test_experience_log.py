"""The experience log holds a batch while the database is away, and drops only what it refuses."""

import asyncpg
import pytest

from cluster.platform.database import DatabaseUnavailable, unavailable_on_connection_errors
from serve_app.experience_log import ExperienceLog, ServedSearch


class FlakyPool:
    """Answers COPY with the given errors first, then stores the rows."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.rows: list[tuple] = []

    async def copy_records_to_table(self, table: str, *, records, columns) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.rows += records


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


async def test_rows_the_database_refuses_are_dropped_and_counted():
    pool = FlakyPool(asyncpg.CharacterNotInRepertoireError("invalid byte sequence"))
    log = ExperienceLog(pool, capacity=10, flush_interval_s=0.001)
    await log._write([served("a"), served("b")])
    assert pool.rows == [] and log.dropped == 2
