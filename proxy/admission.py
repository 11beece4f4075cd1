"""Admission control: at most `max_concurrent` requests in flight, a bounded FIFO queue behind
them, and a clear 429 beyond that.

A queued request whose client leaves is cancelled by the request path's disconnect watcher; the
`finally` below takes it out of the queue, so it never holds a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import TooManyRequests


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, queue_timeout: float) -> None:
        self.max_concurrent = max_concurrent  # 0 = unlimited
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _retry_after(self) -> int:
        return max(1, int(self.queue_timeout / 4))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.max_concurrent and self.active >= self.max_concurrent:
            await self._wait()
        else:
            self.active += 1
        try:
            yield
        finally:
            self._release()

    async def _wait(self) -> None:
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise TooManyRequests(
                f"the proxy is at its limit of {self.max_concurrent} concurrent requests and "
                f"{self.max_queue} queued; retry later",
                retry_after=self._retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            self.rejected += 1
            raise TooManyRequests(
                f"waited {self.queue_timeout:g}s in the proxy's queue without a free slot; "
                "retry later",
                retry_after=self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed to us as we were cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):  # already taken off by _release
                self._waiters.remove(waiter)

    def _release(self) -> None:
        """Hand the slot to the oldest live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; `active` is unchanged
                return
        self.active -= 1
