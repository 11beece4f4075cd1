"""Serving processes for the tests of proxy.procs: real processes (multiprocessing, 'spawn'),
each attached to the shared state by name, driven over a pipe by the test, reporting back over
it. The test is the control process: it creates the shared state and reads it.

Every wait has a deadline; every process is stopped by its handle (exit, then kill) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import proxy.procs.admission as admission_module
from proxy.errors import TooManyRequests
from proxy.procs.admission import SharedAdmission
from proxy.procs.loadtable import LoadTable
from proxy.procs.slots import SlotTable

DEADLINE = 30.0  # seconds: generous, the test box is small and busy
SPAWN = multiprocessing.get_context("spawn")

Message = tuple[Any, ...]


class Agent:
    """The test's end of one serving process: commands out, events in."""

    def __init__(self, target: Callable[..., None], name: str, index: int) -> None:
        self.conn, child = SPAWN.Pipe()
        self.gate = SPAWN.Event()  # lets a process blocked on it go on
        self.events: list[Message] = []
        self.process = SPAWN.Process(target=target, args=(name, index, child, self.gate))
        self.process.start()
        child.close()

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def expect(
        self, kind: str | tuple[str, ...], key: Any = None, timeout: float = DEADLINE
    ) -> Message:
        """The first event of `kind` (or of one of several) and `key` (its second field), not
        yet taken."""
        kinds = (kind,) if isinstance(kind, str) else kind
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event[0] in kinds and (key is None or event[1] == key):
                    self.events.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                raise AssertionError(f"no {kind} {key} event within {timeout}s: {self.events}")
            self.events.append(self.conn.recv())

    def kill(self) -> None:
        self.process.kill()
        self.process.join(DEADLINE)

    def stop(self) -> None:
        if self.process.is_alive():
            self.send("exit")
            self.process.join(5)
        if self.process.is_alive():
            self.kill()
        self.conn.close()


def wait_until(predicate: Callable[[], object], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


# the load table's serving process: synchronous commands, one answer each


def load_agent(name: str, column: int, conn: Connection, gate: Event) -> None:
    table = LoadTable.attach(name, column)
    try:
        while conn.poll(DEADLINE):
            command, *args = conn.recv()
            if command == "exit":
                return
            slot, generation, *amounts = args
            row = table.row(slot, generation)
            if command == "add":
                row.add(*amounts)
            elif command == "sub":
                row.sub(*amounts)
            conn.send(("row", row.inflight, row.chars, row.current))
    finally:
        table.close()


# the admission's serving process: an event loop, requests as tasks


class _Requests:
    def __init__(self, admission: SharedAdmission, conn: Connection, gate: Event) -> None:
        self.admission = admission
        self.conn = conn
        self.gate = gate
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.releases: dict[str, asyncio.Event] = {}
        self.exit = asyncio.Event()

    def on_command(self) -> None:
        while self.conn.poll():
            command, *args = self.conn.recv()
            getattr(self, f"do_{command}")(*args)

    def do_exit(self) -> None:
        self.exit.set()

    def do_configure(self, poll: float, rings: bool) -> None:
        """Look at this process's waiters every `poll` seconds; with `rings` False, ring no
        other process's doorbell (as a sender that died before its ring)."""
        admission_module.POLL = poll
        if not rings:
            self.admission._doorbell.ring = lambda process: None  # type: ignore[method-assign]
        self.conn.send(("configured", None))

    def do_request(self, name: str, priority: int, hold: float | None = None) -> None:
        """Ask for a slot; once in, hold it `hold` seconds, or until released by name."""
        self.releases[name] = asyncio.Event()
        task = self.tasks[name] = asyncio.create_task(self.request(name, priority, hold))
        task.add_done_callback(lambda task: self.cancelled(name, task))

    def cancelled(self, name: str, task: asyncio.Task[None]) -> None:
        """Tell a cancel, even of a task cancelled before it ran (at exit: to nobody)."""
        if task.cancelled():
            with contextlib.suppress(OSError):
                self.conn.send(("cancelled", name))

    def do_release(self, name: str) -> None:
        self.releases[name].set()

    def do_cancel(self, name: str) -> None:
        self.tasks[name].cancel()

    def do_stall_then_cancel(self, name: str) -> None:
        """Block this process's loop until the test opens the gate, then cancel `name`: what a
        ring or a grant meanwhile did is seen only after the cancel."""
        self.conn.send(("stalling", name))
        self.gate.wait(DEADLINE)
        self.tasks[name].cancel()

    def do_lock_and_hang(self) -> None:
        """Take the table's lock and never give it back (the test kills this process)."""
        with self.admission.table.segment.locked():
            self.conn.send(("locked", None))
            time.sleep(DEADLINE)

    async def request(self, name: str, priority: int, hold: float | None) -> None:
        try:
            async with self.admission.slot(priority):
                self.conn.send(("admitted", name, time.monotonic(), self.admission.active))
                if hold is None:
                    await self.releases[name].wait()
                else:
                    await asyncio.sleep(hold)
                self.conn.send(("done", name, time.monotonic()))
        except TooManyRequests as error:
            self.conn.send(("rejected", name, error.message))


def admission_agent(name: str, index: int, conn: Connection, gate: Event) -> None:
    # waiters are told by the doorbell alone, unless a test configures the poll back
    admission_module.POLL = DEADLINE * 100

    async def serve() -> None:
        admission = SharedAdmission.attach(name, index)
        requests = _Requests(admission, conn, gate)
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), requests.on_command)
        conn.send(("ready", index))
        try:
            await asyncio.wait_for(requests.exit.wait(), DEADLINE * 2)
        finally:
            loop.remove_reader(conn.fileno())
            for task in requests.tasks.values():
                task.cancel()
            await asyncio.gather(*requests.tasks.values(), return_exceptions=True)
            admission.close()

    asyncio.run(serve())


def admission_agents(table: SlotTable, count: int) -> list[Agent]:
    agents = [Agent(admission_agent, table.name, i) for i in range(count)]
    for i, agent in enumerate(agents):
        agent.expect("ready", i)
    return agents
