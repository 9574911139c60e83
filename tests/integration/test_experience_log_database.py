"""The experience log against a real PostgreSQL: a batch with rows already stored is written row by
row, keeping the stored ones, with nothing dropped (a COPY retried after it committed unseen)."""

from __future__ import annotations

import pytest

from serve_app.experience_log import ExperienceLog, ServedSearch

pytestmark = pytest.mark.integration


def served(search_id: str) -> ServedSearch:
    return ServedSearch(search_id, "control", None, "s", "q", 5, [0.1, 0.2], 1, "hybrid@0.5", 0.9, 3, ["d1"],
                        [0.1, 0.9], "extractive", 12.5, 14.0, None, None, None, None, None)


async def test_a_batch_with_stored_rows_keeps_them_and_writes_the_rest(empty_pool):
    log = ExperienceLog(empty_pool, capacity=10, flush_interval_s=0.001)
    await log._write([served("a"), served("b")])
    await log._write([served("b"), served("c")])  # COPY refuses the duplicate id
    rows = await empty_pool.fetch("SELECT search_id, propensity, context FROM experiences ORDER BY search_id")
    assert [row["search_id"] for row in rows] == ["a", "b", "c"] and log.dropped == 0
    assert rows[2]["propensity"] == pytest.approx(0.9) and list(rows[2]["context"]) == pytest.approx([0.1, 0.2])
