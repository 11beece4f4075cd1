"""LMCache's PD buffer as pages of one chunk each: what a push reserves and allocates, and what
a retrieve gives back.

As LMCache 0.5.0's PD backend keeps it: the buffer is ``pd_buffer_size`` cut into one-chunk
pages, and a chunk takes a whole page whatever its length (a partial last chunk too). A push is
first admitted against the chunks other pushes in flight have reserved (the receiver's
reservation manager: it counts pushes still allocating, not pages already held), then takes one
page per chunk; a page that is not free is waited for, up to ``pd_allocation_timeout_sec``
(infinite by default). Pages come back only when given back: on the decoder when a request
retrieves its chunks (``remove_after_retrieve``), on the prefiller when a push is done with its
staged copy. Nothing else frees a page: no eviction, no expiry.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class PageBuffer:
    """Pages of one chunk: ``used`` of ``total`` held, ``reserved`` by pushes in flight,
    ``waiting`` = pushes (or saves) waiting for room now."""

    def __init__(self, total: int, timeout: float = math.inf) -> None:
        self.total = total
        self.used = 0
        self.reserved = 0
        self.waiting = 0
        self.timeouts = 0
        self._timeout = timeout
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def free(self) -> int:
        return self.total - self.used

    async def reserve(self, chunks: int) -> bool:
        """Admit a push of ``chunks`` against the other pushes in flight; False on timeout."""
        if not await self._until(lambda: self.total - self.reserved >= chunks):
            return False
        self.reserved += chunks
        return True

    def unreserve(self, chunks: int) -> None:
        self.reserved -= chunks
        self._wake()

    async def take(self) -> bool:
        """One page, waiting for a free one; False on timeout."""
        if not await self._until(lambda: self.used < self.total):
            return False
        self.used += 1
        return True

    def give(self, pages: int) -> None:
        self.used -= pages
        self._wake()

    async def take_all(self, pages: int) -> bool:
        """``pages`` pages one by one, each waited for; on timeout the ones taken go back."""
        taken = 0
        try:
            while taken < pages:
                if not await self.take():
                    break
                taken += 1
        finally:
            if taken < pages:  # timed out, or cancelled (the server closing)
                self.give(taken)
        return taken == pages

    async def _until(self, ready: Callable[[], bool]) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        self.waiting += 1
        try:
            while not ready():
                if self._closed:
                    return False
                left = deadline - loop.time()
                if left <= 0:
                    self.timeouts += 1
                    return False
                woken: asyncio.Future[None] = loop.create_future()
                self._waiters.append(woken)
                try:
                    await asyncio.wait_for(woken, None if math.isinf(left) else left)
                except TimeoutError:
                    pass
                finally:
                    if woken in self._waiters:
                        self._waiters.remove(woken)
            return True
        finally:
            self.waiting -= 1

    def close(self) -> None:
        """The server is closing: every wait ends, unsuccessful."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for woken in waiters:
            if not woken.done():
                woken.set_result(None)

    def state(self) -> dict[str, int]:
        return {
            "total": self.total,
            "used": self.used,
            "reserved": self.reserved,
            "waiting": self.waiting,
            "timeouts": self.timeouts,
        }
