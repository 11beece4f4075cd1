"""Wake-ups between the processes of one shared admission: a process that hands a slot to a
waiter of another process, or takes its place in a full queue, rings that process's doorbell, and
the owner's event loop looks at its waiters at once instead of at its next poll.

A doorbell is a Unix datagram socket bound to an abstract address (Linux: no file to clean up;
the address goes with the socket, so a restarted process binds it again). A ring is one byte and
carries no news: the news is in the shared table, written before the ring, and the owner reads
it after draining its socket, so a ring is never early. A ring is never lost either: the send is
non-blocking, and it fails only when the owner's socket already holds rings it has yet to drain
(it will wake anyway) or when nobody listens (the owner died; the control process resets its
rows). A process binds its doorbell before it publishes its first waiter, so no ring that
concerns it can come before.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable


class Doorbell:
    """The doorbells of table `name`: ring any process's, listen on one's own."""

    def __init__(self, name: str) -> None:
        self._prefix = f"\0pdproxy.{name}."
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self._in: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _address(self, process: int) -> str:
        return f"{self._prefix}{process}"

    def ring(self, process: int) -> None:
        # failing: rings are pending there already, or nobody listens (see the docstring)
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            self._out.sendto(b"\1", self._address(process))

    def listen(self, process: int, on_ring: Callable[[], None]) -> None:
        """Call `on_ring` on this event loop whenever `process`'s doorbell rings; idempotent."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._in is None:
            self._in = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._in.setblocking(False)
            self._in.bind(self._address(process))
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._in.fileno())
        loop.add_reader(self._in.fileno(), self._drain, on_ring)
        self._loop = loop

    def _drain(self, on_ring: Callable[[], None]) -> None:
        assert self._in is not None
        try:
            while True:
                self._in.recv(64)
        except BlockingIOError:
            pass
        on_ring()

    def close(self) -> None:
        if self._in is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._in.fileno())
            self._in.close()
            self._in = None
        self._out.close()
