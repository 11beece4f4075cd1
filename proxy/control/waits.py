"""A leg waiting on an engine, as the stall watch (proxy.control.stall) sees it.

The request path enters a `Wait` around each leg that waits for an engine to complete something:
a prefill leg (its answer, and with LMCache its transfer-done notification), a streamed decode
leg until its first bytes. While inside, the wait is in its worker's `waiting` set; leaving it
normally is progress (the worker's `last_progress`). `abort` ends the leg at once with an
UpstreamTimeout that names why, so that the request path's failover takes over.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from types import TracebackType
from typing import Protocol

from proxy.errors import UpstreamTimeout


class Waited(Protocol):
    """What a wait needs of its worker (proxy.control.workers.Worker)."""

    waiting: set[Wait]
    last_progress: float


class Wait:
    __slots__ = ("_timeout", "reason", "started", "worker")

    def __init__(self, worker: Waited) -> None:
        self.worker = worker
        self.started = 0.0
        self.reason: str | None = None  # why it was aborted
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> Wait:
        self.started = perf_counter()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self.worker.waiting.add(self)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.worker.waiting.discard(self)
        timeout, self._timeout = self._timeout, None
        assert timeout is not None
        try:
            await timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            if self.reason is None:
                raise
            raise UpstreamTimeout(self.reason) from None
        if kind is None:
            self.worker.last_progress = perf_counter()

    def abort(self, reason: str) -> None:
        """End the leg now (in its own task) with UpstreamTimeout(reason)."""
        if self._timeout is not None and self.reason is None:
            self.reason = reason
            self._timeout.reschedule(asyncio.get_running_loop().time())
