"""Admission control: at most `max_concurrent` requests in flight, a bounded queue behind them
served by priority (lower value first, as vLLM orders it; first come, first served within one
priority), and a clear 429 beyond that.

A full queue takes a request of a better priority than its worst waiter: that waiter (the latest
of the worst priority) gets the 429 instead, so that batch traffic cannot lock interactive
traffic out. A queued request whose client leaves is cancelled by the request path's disconnect
watcher; the `finally` below takes it out of the queue, so it never holds a slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from proxy.errors import TooManyRequests

# (priority, arrival number, waiter): heap order is the order of service
_Entry = tuple[int, int, "asyncio.Future[None]"]


class Gate(Protocol):
    """What the request path and /stats use of an admission: this process's `Admission`, or the
    one shared by the serving processes of `workers` > 1 (proxy.procs.admission)."""

    @property
    def max_concurrent(self) -> int: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def queue_timeout(self) -> float: ...
    @property
    def active(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    def slot(self, priority: int = 0) -> AbstractAsyncContextManager[None]: ...


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, queue_timeout: float) -> None:
        self.max_concurrent = max_concurrent  # 0 = unlimited
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self.rejected = 0
        self._heap: list[_Entry] = []  # also holds waiters that left; they are skipped
        self._arrivals = itertools.count()
        self._queued = 0  # waiters still waiting

    @property
    def queued(self) -> int:
        return self._queued

    def _retry_after(self) -> int:
        return max(1, int(self.queue_timeout / 4))

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        if self.max_concurrent and self.active >= self.max_concurrent:
            await self._wait(priority)
        else:
            self.active += 1
        try:
            yield
        finally:
            self._release()

    async def _wait(self, priority: int) -> None:
        if self._queued >= self.max_queue and not self._evict_worse_than(priority):
            self.rejected += 1
            raise TooManyRequests(
                f"the proxy is at its limit of {self.max_concurrent} concurrent requests and "
                f"{self.max_queue} queued; retry later",
                retry_after=self._retry_after(),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._arrivals), waiter))
        self._queued += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            if self._granted(waiter):
                return  # the slot came just as the deadline passed: take it
            self.rejected += 1
            raise TooManyRequests(
                f"waited {self.queue_timeout:g}s in the proxy's queue without a free slot; "
                "retry later",
                retry_after=self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            if self._granted(waiter):
                self._release()  # the slot was handed to us as we were cancelled: pass it on
            raise
        finally:
            # granted and evicted waiters were counted out by _release/_evict_worse_than; a
            # timed-out or cancelled one (the task's cancel also cancels what it awaits) is here
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                self._queued -= 1
                self._compact()

    @staticmethod
    def _granted(waiter: asyncio.Future[None]) -> bool:
        return waiter.done() and not waiter.cancelled() and waiter.exception() is None

    def _evict_worse_than(self, priority: int) -> bool:
        """Reject the queue's worst waiter if its priority is worse than `priority`."""
        live = [entry for entry in self._heap if not entry[2].done()]
        if not live:
            return False
        worst = max(live, key=lambda entry: (entry[0], entry[1]))
        if worst[0] <= priority:
            return False
        self.rejected += 1
        self._queued -= 1
        worst[2].set_exception(
            TooManyRequests(
                f"a request of a better priority (lower than {worst[0]}) took this request's "
                f"place in the proxy's full queue of {self.max_queue}; retry later",
                retry_after=self._retry_after(),
            )
        )
        return True

    def _compact(self) -> None:
        """Drop waiters that left, once they outnumber the live ones."""
        if len(self._heap) > 2 * self._queued + 16:
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)

    def _release(self) -> None:
        """Hand the slot to the first live waiter by priority, or free it."""
        while self._heap:
            _, _, waiter = heapq.heappop(self._heap)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; `active` is unchanged
                self._queued -= 1
                return
        self.active -= 1
