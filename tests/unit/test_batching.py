"""BusyBatcher: no wait when idle, and whatever queued while a batch ran goes in the next one."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.batching import BusyBatcher


class GatedModel:
    """A batch function that records each batch and runs only when the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        self.started.set()
        await self.gate.wait()
        if "bad" in items:
            raise ValueError("the model refused 'bad'")
        return [item.upper() for item in items]


async def until(condition, message: str) -> None:
    """Yield to the event loop until `condition()` holds; no clock involved."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(message)


async def test_an_idle_batcher_runs_a_lone_item_at_once():
    model = GatedModel()
    model.gate.set()
    batcher = BusyBatcher(model, max_batch_size=8)
    assert await batcher("a") == "A"
    assert model.batches == [["a"]]


async def test_items_that_arrive_while_a_batch_runs_go_together_into_the_next():
    model = GatedModel()
    batcher = BusyBatcher(model, max_batch_size=3)
    first = asyncio.create_task(batcher("a"))
    await model.started.wait()
    queued = [asyncio.create_task(batcher(item)) for item in "bcdef"]
    await until(lambda: len(batcher._waiting) == 5, "the later items never queued")
    model.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*queued) == list("BCDEF")
    # At most max_batch_size per batch, in arrival order.
    assert model.batches == [["a"], ["b", "c", "d"], ["e", "f"]]


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_still_runs():
    model = GatedModel()
    batcher = BusyBatcher(model, max_batch_size=2)
    failing = [asyncio.create_task(batcher(item)) for item in ("ok", "bad")]
    await model.started.wait()
    later = asyncio.create_task(batcher("c"))
    await until(lambda: len(batcher._waiting) == 1, "the later item never queued")
    model.gate.set()
    for task in failing:
        with pytest.raises(ValueError, match="refused 'bad'"):
            await task
    assert await later == "C"


async def test_a_caller_that_gave_up_is_left_out_of_the_batch():
    model = GatedModel()
    batcher = BusyBatcher(model, max_batch_size=4)
    first = asyncio.create_task(batcher("a"))
    await model.started.wait()
    abandoned, kept = asyncio.create_task(batcher("b")), asyncio.create_task(batcher("c"))
    await until(lambda: len(batcher._waiting) == 2, "the later items never queued")
    abandoned.cancel()
    model.gate.set()
    assert (await first, await kept) == ("A", "C")
    assert model.batches == [["a"], ["c"]]


async def test_a_batch_function_that_loses_results_is_an_error_for_its_callers():
    async def short(items: list[str]) -> list[str]:
        return items[:-1]

    batcher = BusyBatcher(short, max_batch_size=4)
    results = await asyncio.gather(batcher("a"), batcher("b"), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) and "2 items gave 1" in str(result) for result in results)


def test_a_batch_needs_room_for_one_item():
    with pytest.raises(ValueError, match="at least 1"):
        BusyBatcher(GatedModel(), max_batch_size=0)
