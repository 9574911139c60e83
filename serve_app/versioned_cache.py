"""A replica's copy of something versioned that an actor owns (the policy, the live config).

A background task asks the owner for a newer version every `refresh_s`; the request path only
reads `current` and never waits on the actor. While the owner is away (restarting) the replica
keeps acting on the copy it has, and says so once in the log, and again when it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Versioned(Protocol):
    @property
    def version(self) -> int: ...


V = TypeVar("V", bound=Versioned)


class VersionedCache(Generic[V]):
    def __init__(self, name: str, fetch_if_newer: Callable[[int], Awaitable[V | None]], refresh_s: float):
        self._name = name
        self._fetch_if_newer = fetch_if_newer
        self._refresh_s = refresh_s
        self._failing = False
        self.current: V | None = None

    @property
    def version(self) -> int:
        return self.current.version if self.current else 0

    async def refresh(self) -> None:
        newer = await self._fetch_if_newer(self.version)
        if newer is not None:
            self.current = newer

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # the owner is away: keep the copy we have
                if not self._failing:
                    log.warning("cannot refresh the %s; acting on version %d until its owner answers",
                                self._name, self.version, extra={"error": repr(error)})
                self._failing = True
            else:
                if self._failing:
                    log.warning("the %s refreshes again (version %d)", self._name, self.version)
                self._failing = False
            await asyncio.sleep(self._refresh_s)
