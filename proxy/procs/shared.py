"""The control process's side of what the serving processes share: it creates the load table
(proxy.procs.loadtable) and the global admission's table (proxy.procs.admission), gives each
worker its slot of the load table, reads both for its own views, and cleans up after a serving
process that died.

    slots       every member of every pool gets a slot and its generation when the control
                process first publishes it (`assign`, called before each snapshot is described),
                and gives it back once the worker has left the pools; the snapshot carries them
                (proxy.procs.snapshot)
    size        `SLOTS` engines at once: a table never grows, so it is sized generously (16
                bytes a slot per serving process: 16 KiB each; a policy's read sums one cell per
                process, whatever the size); a worker that finds no free slot is logged and left
                out of the snapshots (no serving process routes to it) until one frees
    its view    every `tick` the control process copies each worker's summed requests in flight
                and prompt characters onto its own workers (`show`): /stats, /metrics, the
                console, the scrapes' `inflight_at_scrape` and an admin drain's wait read them
                there; its admission is `AdmissionView`, the global numbers read from the table
    a death     `reset` zeroes the dead process's column and frees what it held in the admission
                (its slots go to the best waiters of the others) before its replacement starts

The serving process `wN` takes column / process index N-1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager

from proxy.config.sections import AdmissionConfig
from proxy.control.workers import Worker, WorkerPool
from proxy.procs.admission import TableNumbers, reset_process
from proxy.procs.loadtable import DECODE_STREAMS, PREFILL_TOKENS, LoadTable
from proxy.procs.slots import SlotTable

log = logging.getLogger("pdproxy")

SLOTS = 1024  # engines at once


def index_of(name: str) -> int:
    """The column of serving process `name` (`w1` -> 0)."""
    return int(name.removeprefix("w")) - 1


class AdmissionView(TableNumbers):
    """The control process's admission (proxy.serve.admission.Gate): the serving processes admit;
    this one admits nothing and shows the global numbers, read from the shared table."""

    def slot(self, priority: int = 0) -> AbstractAsyncContextManager[None]:
        raise RuntimeError("the control process admits no request: its serving processes do")


class Shared:
    """The shared tables, as their creator (the control process) holds them."""

    def __init__(self, processes: int, admission: AdmissionConfig) -> None:
        self.load = LoadTable.create(processes, SLOTS)
        self.admission = SlotTable.create(
            processes, admission.max_concurrent, admission.max_queue, admission.queue_timeout
        )
        self.slots: dict[Worker, tuple[int, int]] = {}  # worker -> (slot, generation)
        self._short = False  # a worker went without a slot (logged once until one is free)

    def args(self) -> list[str]:
        """What a serving process needs to attach (proxy.procs.serving's arguments)."""
        return ["--load-table", self.load.name, "--admission", self.admission.name]

    def assign(self, pools: Iterable[WorkerPool]) -> dict[Worker, tuple[int, int]]:
        """Give back the slots of workers that left the pools, give new members one."""
        members = [w for pool in pools for w in pool.members]
        present = set(members)
        for worker in [w for w in self.slots if w not in present]:
            slot, _ = self.slots.pop(worker)
            self.load.release(slot)
        for worker in members:
            if worker in self.slots:
                continue
            try:
                self.slots[worker] = self.load.assign()
            except RuntimeError as exc:  # all in use: it waits, unpublished
                if not self._short:
                    log.error("%s worker %s is not routed: %s", worker.role, worker.url, exc)
                    self._short = True
                return self.slots
        self._short = False
        return self.slots

    def show(self) -> None:
        """Copy each worker's requests in flight, prompt characters, prefill tokens and decode
        streams, summed over the serving processes, onto the control process's worker (and end
        an admin drain's wait at 0)."""
        for worker, (slot, _) in self.slots.items():
            worker.inflight = self.load.inflight(slot)
            worker.inflight_chars = self.load.chars(slot)
            worker.prefill_tokens = self.load.total(slot, PREFILL_TOKENS)
            worker.decode_streams = self.load.total(slot, DECODE_STREAMS)
            if not worker.inflight and worker.idle is not None:
                worker.idle.set()  # an admin drain waits for this (WorkerRegistry.retire)

    def reset(self, name: str) -> None:
        """Serving process `name` died: zero its column and free what it held in the admission
        (before its replacement starts)."""
        index = index_of(name)
        self.load.reset_column(index)
        reset_process(self.admission, index)

    def close(self) -> None:
        """Remove both tables (at the control process's exit, once nothing serves /stats)."""
        for table in (self.load, self.admission):
            table.unlink()
            table.close()
