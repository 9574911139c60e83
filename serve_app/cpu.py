"""The CPU one coroutine uses on the event loop's thread, among all the others the loop runs.

An awaited coroutine runs in steps: from one resumption to its next suspension it is the only
thing on the thread, so the thread's CPU time over each step is its own. `CpuMeter` drives an
awaitable step by step and adds those up; time spent suspended (waiting on the network, or on
other requests) is not counted. Work handed to other threads or processes is not counted either:
their CPU is measured where it runs.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class CpuMeter:
    """Accumulates the thread CPU of the awaitables it `measure`s, in milliseconds."""

    def __init__(self) -> None:
        self.cpu_ms = 0.0

    async def measure(self, awaitable: Awaitable[T]) -> T:
        return await _Metered(awaitable, self)


class _Metered:
    def __init__(self, awaitable: Awaitable[Any], meter: CpuMeter) -> None:
        self._inner = awaitable.__await__()
        self._meter = meter

    def __await__(self) -> Generator[Any, Any, Any]:
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            started = time.thread_time()
            try:
                signal = self._inner.throw(to_throw) if to_throw is not None else self._inner.send(to_send)
            except StopIteration as done:
                return done.value
            finally:
                self._meter.cpu_ms += (time.thread_time() - started) * 1000
            to_send, to_throw = None, None
            try:
                to_send = yield signal
            except BaseException as error:  # cancellation or an error thrown in: pass it on inside
                to_throw = error
