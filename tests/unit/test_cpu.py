import asyncio
import time

import pytest

from serve_app.cpu import CpuMeter


def spin(seconds: float) -> None:
    """Burn this thread's CPU for `seconds` of thread time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def worker(steps: int, step_s: float) -> int:
    for _ in range(steps):
        spin(step_s)
        await asyncio.sleep(0)  # suspend: another task runs here
    return steps


async def test_counts_the_coroutines_own_steps_not_its_neighbours():
    meter = CpuMeter()
    measured, neighbour = await asyncio.gather(meter.measure(worker(5, 0.01)), worker(5, 0.03))
    assert measured == neighbour == 5
    # its own 50 ms, not the neighbour's 150 ms that ran while it was suspended
    assert 45 <= meter.cpu_ms < 100


async def test_time_spent_waiting_is_not_cpu():
    meter = CpuMeter()
    await meter.measure(asyncio.sleep(0.1))
    assert meter.cpu_ms < 20


async def test_errors_and_cancellation_pass_through():
    meter = CpuMeter()

    async def fails() -> None:
        spin(0.005)
        await asyncio.sleep(0)
        raise KeyError("inner")

    with pytest.raises(KeyError, match="inner"):
        await meter.measure(fails())
    assert meter.cpu_ms >= 4

    cleaned_up = asyncio.Event()

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned_up.set()

    task = asyncio.create_task(meter.measure(waits()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned_up.is_set()
