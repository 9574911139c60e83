"""A replica's copy of the soft-Q policy, refreshed by version in the background.

The request path reads `current` and never waits on the learning actor; when the actor is
away (restarting, not created yet) the replica keeps acting on the copy it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from learners.learning_core import PolicySnapshot

log = logging.getLogger(__name__)

FetchIfNewer = Callable[[int], Awaitable[PolicySnapshot | None]]


class PolicyCache:
    def __init__(self, fetch_if_newer: FetchIfNewer, refresh_s: float):
        self._fetch_if_newer = fetch_if_newer
        self._refresh_s = refresh_s
        self.current: PolicySnapshot | None = None

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
            except Exception as error:  # the actor is away: keep the copy we have
                log.debug("policy refresh failed", extra={"error": repr(error)})
            await asyncio.sleep(self._refresh_s)
