"""A replica's own health: its pool open, its background loops running; never the database."""

import asyncio

import pytest

from serve_app.replica_health import ReplicaBroken, check_alive


class Pool:
    def __init__(self, closing: bool = False) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing


async def forever() -> None:
    await asyncio.Event().wait()


async def broken() -> None:
    raise KeyError("row")


async def test_open_pool_and_running_loops_are_healthy():
    tasks = [asyncio.create_task(forever(), name="log")]
    check_alive(Pool(), tasks)  # type: ignore[arg-type]
    tasks[0].cancel()


async def test_a_closed_pool_or_an_ended_loop_is_broken():
    with pytest.raises(ReplicaBroken, match="pool is closed"):
        check_alive(Pool(closing=True), [])  # type: ignore[arg-type]
    task = asyncio.create_task(broken(), name="experience log")
    await asyncio.sleep(0)
    with pytest.raises(ReplicaBroken, match="'experience log' stopped: KeyError"):
        check_alive(Pool(), [task])  # type: ignore[arg-type]
