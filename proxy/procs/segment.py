"""A named shared-memory segment of 64-bit cells, and the lock that guards it where a lock is due.

The control process creates a segment by name; serving processes attach to it by that name. The
cells are signed 64-bit integers in native byte order, read and written through a memoryview
cast to 'q' over the segment's buffer. The segment starts on a page boundary and every cell on a
multiple of 8 bytes, so every cell is naturally aligned.

Why a lone store or load is never torn: CPython's memoryview packs and unpacks a 'q' item with a
fixed-size 8-byte copy, which compilers emit as one 64-bit move; an aligned 8-byte store or load
is single-copy atomic on x86-64 (Intel SDM vol. 3A, "Guaranteed Atomic Operations") and on
arm64 (Arm ARM, "single-copy atomicity"). A reader sees the old value or the new one, never half
of each. Nothing orders one cell against another, and nothing makes a store visible to the other
cores at once: a reader may see a value one update old, and two cells from slightly different
moments. Counters read as load hints can live with that; what must be exact (admission) takes
`locked`.

Lifetime: Python 3.11 and 3.12 register every SharedMemory, attached or created, with the
process's resource tracker, which unlinks it when that process exits; a serving process that
ends would take the control process's segment with it. Attaching here leaves the tracker out
(3.13's `track=False`); only the creator registers, so the segment goes when the control process
unlinks it or its tracker cleans up after it.

The lock (`locked`) is flock(2) on the segment's own file (POSIX shared memory is a file under
/dev/shm on Linux): the kernel drops a lock whose holder dies, so a serving process killed inside
its critical section cannot wedge the others, as a semaphore it held would.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import numpy.typing as npt

CELL = 8  # bytes: one int64
LINE = 64  # bytes: a cache line; regions written by different processes start on one
_LINE_CELLS = LINE // CELL
_SHM_DIR = "/dev/shm"
_untracked = threading.Lock()  # attach's tracker switch is process-wide


def line_aligned(cells: int) -> int:
    """`cells` rounded up to whole cache lines."""
    return -(-cells // _LINE_CELLS) * _LINE_CELLS


def _attach_untracked(name: str) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    register = resource_tracker.register
    with _untracked:
        resource_tracker.register = lambda name, rtype: None
        try:
            return SharedMemory(name)
        finally:
            resource_tracker.register = register


class Segment:
    """`cells` int64 cells in shared memory named `name` (see the module's docstring)."""

    def __init__(self, shm: SharedMemory, owner: bool) -> None:
        self._shm = shm
        self.owner = owner  # created it: unlinks it
        self.name = shm.name
        assert shm.buf is not None  # None only once closed
        self._buf = shm.buf
        self.cells = shm.buf.cast("q")
        self._lock_fd = -1
        self._lock_pid = -1  # the process that opened _lock_fd: flock locks an open file, which
        # a forked child would share with its parent, and then they would not exclude each other

    @classmethod
    def create(cls, name: str | None, cells: int) -> Segment:
        """A new zeroed segment (the control process); `name` None picks a free one."""
        return cls(SharedMemory(name, create=True, size=cells * CELL), owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """The segment `name` that another process created (a serving process)."""
        return cls(_attach_untracked(name), owner=False)

    def array(self, offset: int, length: int) -> npt.NDArray[np.int64]:
        """Cells `offset` .. `offset + length` as a numpy array over the same memory."""
        return np.ndarray((length,), dtype=np.int64, buffer=self._buf, offset=offset * CELL)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the segment's lock (flock on its file; Linux). Never across an await."""
        if self._lock_pid != os.getpid():  # first use, or a forked child: a descriptor of its own
            self._lock_fd = os.open(os.path.join(_SHM_DIR, self.name.lstrip("/")), os.O_RDWR)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Let go of the memory in this process (its users drop their arrays first: an
        exported buffer pins it)."""
        self.cells.release()
        del self._buf
        if self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = self._lock_pid = -1
        self._shm.close()

    def unlink(self) -> None:
        """Remove the name (the creator, at shutdown); processes attached keep their mapping."""
        self._shm.unlink()
