"""Admission across the serving processes: at most `max_concurrent` requests in flight in all of
them together, one bounded queue behind them served by priority (lower value first; first come,
first served within one priority), and the same 429s as one process's admission
(proxy.serve.admission.Admission), whose interface this keeps: `async with admission.slot(p)`,
`active`, `queued`, `rejected` (all three over every process), `max_concurrent`, `max_queue`,
`queue_timeout`.

The state and every decision on it live in shared memory (proxy.procs.slots), taken under its
lock for a few microseconds, never across an await. What one process cannot do is resolve another
process's futures. So a decision that concerns another process's waiter (its grant when a slot is
released, its eviction from a full queue) is written into its row and that process's doorbell is
rung (proxy.procs.doorbell); the owner's event loop reads its waiters' rows and resolves their
futures. A grant to a waiter of the releasing process itself is resolved at once. A slow poll
(every `POLL` seconds, only while this process has waiters) backs the doorbell up where a ring
could not be sent: a sender that died between its decision and its ring.

A granted waiter's slot is its own from the grant: one that leaves (timed out or cancelled) at
that moment takes the slot on a timeout, as Admission does, or passes it on when cancelled. A
waiter that leaves before its grant frees its row, so it never holds a slot.

With `max_concurrent` 0 (unlimited) no lock is taken: each process counts its requests in its own
cell for `active`.

The control process creates the table (`SlotTable.create`), reads it for its stats, and when a
serving process dies calls `reset_process` before it starts the replacement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import TooManyRequests
from proxy.procs.doorbell import Doorbell
from proxy.procs.slots import Outcome, SlotTable, Waiter

POLL = 0.05  # seconds between looks at this process's waiters, besides the doorbell


def reset_process(table: SlotTable, process: int) -> None:
    """Serving process `process` died: free its slots and its waiters' places, and wake the
    processes whose waiters get the freed slots (the control process, before the restart)."""
    with table.segment.locked():
        granted = table.reset(process)
    doorbell = Doorbell(table.name)
    try:
        for owner in {waiter.owner for waiter in granted}:
            doorbell.ring(owner)
    finally:
        doorbell.close()


class TableNumbers:
    """What /stats shows of an admission (proxy.serve.admission.Gate), read from the shared
    table: the limits, and the numbers over every process."""

    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self.max_concurrent = table.max_concurrent
        self.max_queue = table.max_queue
        self.queue_timeout = table.queue_timeout

    @property
    def active(self) -> int:
        return self.table.active

    @property
    def queued(self) -> int:
        return self.table.queued

    @property
    def rejected(self) -> int:
        return self.table.rejected


class SharedAdmission(TableNumbers):
    """Serving process `process`'s side of the shared admission table."""

    def __init__(self, table: SlotTable, process: int) -> None:
        if not 0 <= process < table.processes:
            raise ValueError(f"process {process} is not one of the table's {table.processes}")
        super().__init__(table)
        self.process = process
        self._waiters: dict[int, tuple[Waiter, asyncio.Future[None]]] = {}  # by ticket
        self._doorbell = Doorbell(table.name)
        self._poll: asyncio.TimerHandle | None = None

    @classmethod
    def attach(cls, name: str, process: int) -> SharedAdmission:
        return cls(SlotTable.attach(name), process)

    def _retry_after(self) -> int:
        return max(1, int(self.queue_timeout / 4))

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        if not self.max_concurrent:
            self.table.count(self.process, 1)
            try:
                yield
            finally:
                self.table.count(self.process, -1)
            return
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int) -> None:
        self._doorbell.listen(self.process, self._settle)  # before any row of ours is seen
        with self.table.segment.locked():
            arrival = self.table.arrive(self.process, priority)
        if arrival.evicted is not None:
            self._tell_evicted(arrival.evicted)
        if arrival.granted:
            return
        if arrival.queued is None:
            raise self._full()
        await self._wait(arrival.queued)

    async def _wait(self, waiter: Waiter) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[waiter.ticket] = (waiter, future)
        self._start_poll()
        try:
            async with asyncio.timeout(self.queue_timeout):
                await future
        except TimeoutError:
            if not self._leave(waiter, future, timed_out=True):
                raise self._timed_out() from None
        except asyncio.CancelledError:
            if self._leave(waiter, future, timed_out=False):
                self._release()  # the slot came as we were cancelled: pass it on
            raise
        finally:
            del self._waiters[waiter.ticket]
            if not self._waiters and self._poll is not None:
                self._poll.cancel()
                self._poll = None

    def _leave(self, waiter: Waiter, future: asyncio.Future[None], timed_out: bool) -> bool:
        """Take `waiter` out of the queue; whether it holds a slot (granted just now)."""
        if future.done() and not future.cancelled():
            error = future.exception()
            if error is not None and timed_out:
                raise error  # evicted just as it timed out
            return error is None
        with self.table.segment.locked():
            outcome = self.table.leave(waiter, timed_out)
        if outcome is Outcome.EVICTED and timed_out:
            raise self._evicted(waiter)
        return outcome is Outcome.GRANTED

    def _release(self) -> None:
        """Hand our slot to the best waiter of any process, or free it."""
        with self.table.segment.locked():
            waiter = self.table.release(self.process)
            granted = self._own_grant(waiter)
        if granted is not None:
            granted.set_result(None)
        elif waiter is not None and waiter.owner != self.process:
            self._doorbell.ring(waiter.owner)

    def _own_grant(self, waiter: Waiter | None) -> asyncio.Future[None] | None:
        """The future to resolve when the slot went to one of our own waiters that still waits
        (one whose task is being cancelled keeps its grant in its row and passes it on)."""
        if waiter is None or waiter.owner != self.process:
            return None
        _, future = self._waiters[waiter.ticket]
        if future.done() or self.table.settle(waiter) is not Outcome.GRANTED:
            return None
        return future

    def _tell_evicted(self, waiter: Waiter) -> None:
        if waiter.owner != self.process:
            self._doorbell.ring(waiter.owner)
            return
        _, future = self._waiters[waiter.ticket]
        if not future.done():
            future.set_exception(self._evicted(waiter))

    def _settle(self) -> None:
        """Resolve the futures of our waiters that were granted or evicted."""
        moved = [
            (waiter, future)
            for waiter, future in self._waiters.values()
            if not future.done() and self.table.moved(waiter)
        ]
        if not moved:
            return
        with self.table.segment.locked():
            outcomes = [(self.table.settle(waiter), waiter, future) for waiter, future in moved]
        for outcome, waiter, future in outcomes:
            if outcome is Outcome.GRANTED:
                future.set_result(None)
            elif outcome is Outcome.EVICTED:
                future.set_exception(self._evicted(waiter))

    def _start_poll(self) -> None:
        if self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(POLL, self._on_poll)

    def _on_poll(self) -> None:
        self._poll = None
        self._settle()
        if self._waiters:
            self._start_poll()

    def _full(self) -> TooManyRequests:
        return TooManyRequests(
            f"the proxy is at its limit of {self.max_concurrent} concurrent requests and "
            f"{self.max_queue} queued; retry later",
            retry_after=self._retry_after(),
        )

    def _timed_out(self) -> TooManyRequests:
        return TooManyRequests(
            f"waited {self.queue_timeout:g}s in the proxy's queue without a free slot; retry later",
            retry_after=self._retry_after(),
        )

    def _evicted(self, waiter: Waiter) -> TooManyRequests:
        return TooManyRequests(
            f"a request of a better priority (lower than {waiter.priority}) took this request's "
            f"place in the proxy's full queue of {self.max_queue}; retry later",
            retry_after=self._retry_after(),
        )

    def close(self) -> None:
        """Let go of the table and the doorbell in this process."""
        self._doorbell.close()
        self.table.close()
