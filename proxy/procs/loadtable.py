"""Per-engine load counters shared by the serving processes: what a policy in any process reads
as an engine's requests in flight and prompt characters queued, at once, not at the next scrape.

The table lives in shared memory (proxy.procs.segment) that the control process creates by name
and every serving process attaches to. Rows are engine slots, columns are serving processes:

    header   columns, slots
    gen      one generation number per slot
    column 0 (inflight, chars, prefill tokens, decode streams) for slot 0 ... S-1  <- process 0
    column 1 (the same four) for slot 0 ... S-1                                    <- process 1
    ...

Each process writes only its own column, from its event loop's thread: one writer per cell, so a
write is a plain read-modify-write of a cell, with no lock and no atomic instruction on the hot
path. A reader sums the slot's cells across the columns; each cell it reads is whole (aligned
64-bit loads are not torn, see proxy.procs.segment) but may be one update old, and the sum is not
a snapshot of one moment: it may miss what other processes did in the last microseconds, against
the seconds of a scrape it replaces, which a load heuristic tolerates. A column is contiguous and
starts on a cache line, so processes never write to the same line (no false sharing).

Slots are the control process's to give: `assign` hands out a slot for a new worker (the worker
carries the slot and its generation to the serving processes) and `release` takes it back when
the worker is removed. A reused slot is zeroed, and its generation bumped first, before it is
handed out again; a process still holding the old worker's `Row` sees the generation move (the
row is stale: it reads 0 and its writes are dropped), so the old engine's late decrements never
land on the new one. The check and the write are two steps, so a write racing the reuse could
still slip through; `assign` therefore reuses the slot freed longest ago among those nobody has a
request in flight on (a worker is removed after it drained), which leaves no such writer.

A serving process that dies leaves its column as it was; the control process zeroes it
(`reset_column`) before it starts the replacement, which then writes that column from zero.
"""

from __future__ import annotations

from collections import deque

from proxy.procs.segment import Segment, line_aligned

_HEADER = 2  # columns, slots
_FIELDS = 4  # inflight, chars, and the pool's: prefill tokens not computed yet, decode streams
PREFILL_TOKENS = 2
DECODE_STREAMS = 3
_NO_COLUMN = -(1 << 62)


class LoadTable:
    """The table as one process sees it. `column` is the serving process's own column; the
    control process (which creates the table) has none: it reads, assigns slots and resets."""

    def __init__(self, segment: Segment, column: int | None) -> None:
        self._segment = segment
        self.cells = segment.cells
        self.columns = self.cells[0]
        self.slots = self.cells[1]
        if column is not None and not 0 <= column < self.columns:
            raise ValueError(f"column {column} is not one of the table's {self.columns}")
        self.column = column
        self._gen = line_aligned(_HEADER)
        self._stride = line_aligned(_FIELDS * self.slots)  # cells from one column to the next
        self._first = self._gen + line_aligned(self.slots)  # column 0's first cell
        self._end = self._first + self.columns * self._stride
        # no column: a write indexes far outside the table, which fails at no cost to the others
        self._own = _NO_COLUMN if column is None else self._first + column * self._stride
        self._free: deque[int] = deque(range(self.slots))  # the creator's: slots to assign

    @classmethod
    def create(cls, columns: int, slots: int, name: str | None = None) -> LoadTable:
        """A zeroed table for `columns` serving processes and `slots` engines (control)."""
        stride = line_aligned(_FIELDS * slots)
        size = line_aligned(_HEADER) + line_aligned(slots) + columns * stride
        segment = Segment.create(name, size)
        segment.cells[0], segment.cells[1] = columns, slots
        return cls(segment, None)

    @classmethod
    def attach(cls, name: str, column: int) -> LoadTable:
        """The table `name`, writing `column` (serving process `column`)."""
        return cls(Segment.attach(name), column)

    @property
    def name(self) -> str:
        return self._segment.name

    # the hot path: this process's column, and the sums

    def add(self, slot: int, inflight: int = 1, chars: int = 0) -> None:
        """Count `inflight` requests and `chars` prompt characters more on `slot`, here."""
        cell = self._own + _FIELDS * slot
        cells = self.cells
        cells[cell] += inflight
        cells[cell + 1] += chars

    def sub(self, slot: int, inflight: int = 1, chars: int = 0) -> None:
        """Undo an `add` of the same amounts."""
        cell = self._own + _FIELDS * slot
        cells = self.cells
        cells[cell] -= inflight
        cells[cell + 1] -= chars

    def inflight(self, slot: int) -> int:
        """Requests in flight on `slot`, summed over the serving processes."""
        first = self._first + _FIELDS * slot
        return sum(self.cells[first : self._end : self._stride])

    def chars(self, slot: int) -> int:
        """Prompt characters queued on `slot`, summed over the serving processes."""
        first = self._first + _FIELDS * slot + 1
        return sum(self.cells[first : self._end : self._stride])

    def total(self, slot: int, field: int) -> int:
        """Field `field` (PREFILL_TOKENS, DECODE_STREAMS) of `slot`, summed over the processes."""
        first = self._first + _FIELDS * slot + field
        return sum(self.cells[first : self._end : self._stride])

    def generation(self, slot: int) -> int:
        return self.cells[self._gen + slot]

    def row(self, slot: int, generation: int) -> Row:
        """`slot` as assigned at `generation`: what a serving process's worker holds."""
        return Row(self, slot, generation)

    # the control process's part

    def _control(self) -> None:
        if not self._segment.owner:
            raise RuntimeError("only the process that created the load table manages its slots")

    def assign(self) -> tuple[int, int]:
        """A zeroed slot for a new worker, and its generation (control process)."""
        self._control()
        slot = self._reusable()
        self.cells[self._gen + slot] += 1  # first: stale rows stop writing
        for column in range(self.columns):
            cell = self._first + column * self._stride + _FIELDS * slot
            self.cells[cell : cell + _FIELDS] = _zeros(_FIELDS)
        return slot, self.generation(slot)

    def _reusable(self) -> int:
        """The slot freed longest ago that nobody has a request in flight on; else the oldest."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} engine slots of the load table are in use")
        for slot in self._free:
            if self.inflight(slot) == 0:
                self._free.remove(slot)
                return slot
        return self._free.popleft()

    def release(self, slot: int) -> None:
        """The worker on `slot` was removed: the slot may be assigned again (control)."""
        self._control()
        if slot in self._free:
            raise ValueError(f"slot {slot} is not assigned")
        self._free.append(slot)

    def reset_column(self, column: int) -> None:
        """Zero serving process `column`'s counters (it died; before its replacement starts)."""
        self._control()
        first = self._first + column * self._stride
        self.cells[first : first + self._stride] = _zeros(self._stride)

    def close(self) -> None:
        """Let go of the table in this process."""
        self._segment.close()

    def unlink(self) -> None:
        """Remove the table's name (the control process, at shutdown)."""
        self._segment.unlink()


def _zeros(cells: int) -> memoryview:
    return memoryview(bytes(cells * 8)).cast("q")


class Row:
    """One engine's counters as a serving process's worker holds them: its own column's writes,
    the summed reads, both only while the slot still has the generation it was assigned at.
    The cells' places are worked out once: this is what a request's path calls."""

    __slots__ = ("_cells", "_end", "_gen", "_own", "_stride", "_sum", "generation", "slot")

    def __init__(self, table: LoadTable, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self._cells = table.cells
        self._gen = table._gen + slot
        self._own = table._own + _FIELDS * slot
        self._sum = table._first + _FIELDS * slot  # column 0's inflight cell
        self._end = table._end
        self._stride = table._stride

    @property
    def current(self) -> bool:
        """The slot still belongs to this row's engine (it was not reused since)."""
        return self._cells[self._gen] == self.generation

    def add(self, inflight: int = 1, chars: int = 0) -> None:
        cells = self._cells
        if cells[self._gen] == self.generation:
            cells[self._own] += inflight
            cells[self._own + 1] += chars

    def sub(self, inflight: int = 1, chars: int = 0) -> None:
        cells = self._cells
        if cells[self._gen] == self.generation:
            cells[self._own] -= inflight
            cells[self._own + 1] -= chars

    @property
    def inflight(self) -> int:
        cells = self._cells
        if cells[self._gen] != self.generation:
            return 0
        return sum(cells[self._sum : self._end : self._stride])

    @property
    def chars(self) -> int:
        cells = self._cells
        if cells[self._gen] != self.generation:
            return 0
        return sum(cells[self._sum + 1 : self._end : self._stride])

    def total(self, field: int) -> int:
        """Field `field` (PREFILL_TOKENS, DECODE_STREAMS), summed over the serving processes."""
        cells = self._cells
        if cells[self._gen] != self.generation:
            return 0
        return sum(cells[self._sum + field : self._end : self._stride])

    def change(self, field: int, delta: int) -> None:
        """Add `delta` to field `field` in this process's column."""
        cells = self._cells
        if cells[self._gen] == self.generation:
            cells[self._own + field] += delta
