"""The global admission's state in shared memory, and the decisions taken on it: who gets a slot,
who waits, who loses a full queue's place, and what a dead process held.

Every waiter of every serving process is a row of one shared table, so each decision sees all of
them and is exact, as one process's heap is today (proxy.serve.admission):

    header      limits; the next arrival ticket; slots taken; waiters; rejections
    active[p]   slots that serving process p's requests hold (one cache line each)
    rows        state, priority, ticket, owner: a waiter each (FREE rows are unused)

A row is WAITING until a slot is handed to it (GRANTED: the slot is its owner's from then, counted
in `active`) or a better newcomer takes it over (the row is rewritten with the newcomer's ticket).
Only the owner frees its row: when it sees the grant (`settle`), or when its waiter leaves (`leave`:
a timeout or a cancel); the control process frees a dead owner's rows (`reset`). An owner tells what
happened to its waiter by the row's ticket (tickets are unique, so a row whose ticket changed was
taken over) and state, so nothing is lost if it looks late. Waiting rows never exceed max_queue and
granted rows hold active slots, so max_queue + max_concurrent rows always leave a free one for a
newcomer that may queue.

Arrival tickets come from one counter, so first come, first served holds across processes; the
order of service is (priority, ticket), lowest first, as vLLM orders priorities.

Every decision here runs with the table's lock held (`locked`), by whichever process acts: the lock
is the segment's flock (proxy.procs.segment), held for the few microseconds of one decision and
never across an await. Scans over the rows are numpy operations on the shared arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from proxy.procs.segment import Segment, line_aligned

# header cells
_MAX_CONCURRENT, _MAX_QUEUE, _TIMEOUT_US, _PROCESSES, _ROWS = range(5)
_TICKET, _ACTIVE, _WAITING, _REJECTED = range(5, 9)
_HEADER = 9
_LINE_CELLS = 8  # one process's active count per cache line: it writes it alone when unlimited


class State(IntEnum):
    FREE = 0
    WAITING = 1
    GRANTED = 2


class Outcome(IntEnum):
    """What became of a waiter, as its owner learns it."""

    WAITING = 0
    GRANTED = 1  # the slot is the waiter's: its row is freed
    EVICTED = 2  # a better newcomer took its place in the full queue
    LEFT = 3  # it left the queue (timeout, cancel): its row is freed


@dataclass(frozen=True, slots=True)
class Waiter:
    """A waiter's row, as the process acting on it names it."""

    owner: int
    row: int
    ticket: int
    priority: int


@dataclass(frozen=True, slots=True)
class Arrival:
    """What `arrive` decided: a slot now, a row in the queue, or neither (the queue is full and
    no waiter in it is worse). `evicted` is the waiter whose place the row took, if any."""

    granted: bool
    queued: Waiter | None = None
    evicted: Waiter | None = None


class SlotTable:
    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        cells = self.cells = segment.cells
        self.max_concurrent = cells[_MAX_CONCURRENT]
        self.max_queue = cells[_MAX_QUEUE]
        self.queue_timeout = cells[_TIMEOUT_US] / 1e6
        self.processes = cells[_PROCESSES]
        self.rows = cells[_ROWS]
        self._active = line_aligned(_HEADER)
        first = self._active + self.processes * _LINE_CELLS
        width = line_aligned(self.rows)
        self.state, self.priority, self.ticket, self.owner = (
            segment.array(first + i * width, self.rows) for i in range(4)
        )

    @classmethod
    def create(
        cls,
        processes: int,
        max_concurrent: int,
        max_queue: int,
        queue_timeout: float,
        name: str | None = None,
    ) -> SlotTable:
        """An empty table for `processes` serving processes (the control process)."""
        rows = max_queue + max_concurrent if max_concurrent else 0
        size = line_aligned(_HEADER) + processes * _LINE_CELLS + 4 * line_aligned(rows)
        segment = Segment.create(name, size)
        cells = segment.cells
        cells[_MAX_CONCURRENT], cells[_MAX_QUEUE] = max_concurrent, max_queue
        cells[_TIMEOUT_US] = round(queue_timeout * 1e6)
        cells[_PROCESSES], cells[_ROWS] = processes, rows
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> SlotTable:
        return cls(Segment.attach(name))

    @property
    def name(self) -> str:
        return self.segment.name

    # read without the lock: each a single cell (or, unlimited, a sum of cells)

    @property
    def active(self) -> int:
        if self.max_concurrent:
            return self.cells[_ACTIVE]
        return sum(self.cells[self._active :: _LINE_CELLS][: self.processes])

    @property
    def queued(self) -> int:
        return self.cells[_WAITING]

    @property
    def rejected(self) -> int:
        return self.cells[_REJECTED]

    def count(self, process: int, delta: int) -> None:
        """Unlimited admission: `process` counts its own requests, in its own cell, unlocked."""
        self.cells[self._active + process * _LINE_CELLS] += delta

    def moved(self, waiter: Waiter) -> bool:
        """Whether `waiter` may have been granted or taken over (a hint, read unlocked)."""
        row = waiter.row
        return bool(self.ticket[row] != waiter.ticket or self.state[row] == State.GRANTED)

    # decisions: the lock held

    def arrive(self, process: int, priority: int) -> Arrival:
        """A request of `process` asks for a slot."""
        if self.cells[_ACTIVE] < self.max_concurrent:
            self._hold(process, 1)
            return Arrival(granted=True)
        evicted = None
        if self.cells[_WAITING] >= self.max_queue:
            evicted = self._worst()
            if evicted is None or evicted.priority <= priority:
                self.cells[_REJECTED] += 1
                return Arrival(granted=False)
            self.cells[_REJECTED] += 1
            self.cells[_WAITING] -= 1
            row = evicted.row  # taken over: its owner sees the ticket change
        else:
            row = self._free_row()
        ticket = self.cells[_TICKET]
        self.cells[_TICKET] += 1
        self.state[row], self.priority[row] = State.WAITING, priority
        self.ticket[row], self.owner[row] = ticket, process
        self.cells[_WAITING] += 1
        return Arrival(False, Waiter(process, row, ticket, priority), evicted)

    def release(self, process: int) -> Waiter | None:
        """A request of `process` is done with its slot: the slot passes to the best waiter
        (returned: its owner is to be told) or is freed."""
        best = self._best() if self.cells[_WAITING] else None
        self._hold(process, -1)
        if best is not None:
            self.state[best.row] = State.GRANTED
            self.cells[_WAITING] -= 1
            self._hold(best.owner, 1)
        return best

    def settle(self, waiter: Waiter) -> Outcome:
        """The owner looks at its waiter's row; a grant it sees frees the row."""
        row = waiter.row
        if self.ticket[row] != waiter.ticket:
            return Outcome.EVICTED
        if self.state[row] == State.GRANTED:
            self.state[row] = State.FREE
            return Outcome.GRANTED
        return Outcome.WAITING

    def leave(self, waiter: Waiter, timed_out: bool) -> Outcome:
        """The owner's waiter stops waiting (its deadline passed, or it was cancelled)."""
        outcome = self.settle(waiter)
        if outcome is Outcome.WAITING:
            self.state[waiter.row] = State.FREE
            self.cells[_WAITING] -= 1
            self.cells[_REJECTED] += timed_out
            return Outcome.LEFT
        return outcome

    def reset(self, process: int) -> list[Waiter]:
        """`process` died: free what it held and its rows, hand the freed slots to the best
        waiters of the others (returned: their owners are to be told)."""
        own = self._active + process * _LINE_CELLS
        if not self.max_concurrent:
            self.cells[own] = 0
            return []
        mine = np.flatnonzero((self.owner == process) & (self.state != State.FREE))
        self.cells[_WAITING] -= int(np.count_nonzero(self.state[mine] == State.WAITING))
        self.state[mine] = State.FREE
        self._hold(process, -self.cells[own])
        granted = []
        while self.cells[_ACTIVE] < self.max_concurrent and self.cells[_WAITING]:
            best = self._best()
            assert best is not None
            self.state[best.row] = State.GRANTED
            self.cells[_WAITING] -= 1
            self._hold(best.owner, 1)
            granted.append(best)
        return granted

    def _hold(self, process: int, delta: int) -> None:
        self.cells[_ACTIVE] += delta
        self.cells[self._active + process * _LINE_CELLS] += delta

    def _waiter(self, row: int) -> Waiter:
        return Waiter(int(self.owner[row]), row, int(self.ticket[row]), int(self.priority[row]))

    def _best(self) -> Waiter | None:
        """The waiter served next: lowest priority value, then earliest ticket."""
        rows = np.flatnonzero(self.state == State.WAITING)
        if not rows.size:
            return None
        priority = self.priority[rows]
        top = rows[priority == priority.min()]
        return self._waiter(int(top[np.argmin(self.ticket[top])]))

    def _worst(self) -> Waiter | None:
        """The waiter a better newcomer evicts: highest priority value, then latest ticket."""
        rows = np.flatnonzero(self.state == State.WAITING)
        if not rows.size:
            return None
        priority = self.priority[rows]
        bottom = rows[priority == priority.max()]
        return self._waiter(int(bottom[np.argmax(self.ticket[bottom])]))

    def _free_row(self) -> int:
        row = int(np.argmin(self.state))  # FREE is 0: the first free row
        if self.state[row] != State.FREE:
            raise RuntimeError("the shared admission table has no free row")  # see the docstring
        return row

    def close(self) -> None:
        del self.state, self.priority, self.ticket, self.owner
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()
