"""A serving process's end of the channel (proxy.procs.channel): it says hello, waits for the
first snapshot before the process serves, then mirrors every snapshot into the process's pools
(proxy.procs.snapshot) and sends a report every `every` seconds when there is one
(proxy.procs.report). Other messages go to their `handlers` (by type: LMCache's relayed
notifications, proxy.procs.notify; the KV index's changes, proxy.procs.kvreplica). The channel's
end is the control process's end: `lost` is called once, and the process drains and exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from proxy.control.workers import WorkerPool
from proxy.observe.metrics import ProxyMetrics
from proxy.procs.channel import ChannelClosed, read_message, send_message
from proxy.procs.report import Reports
from proxy.procs.snapshot import Mirror

log = logging.getLogger("pdproxy")


class Link:
    def __init__(
        self,
        path: str,
        name: str,
        mirror: Mirror,
        reports: Reports,
        metrics: ProxyMetrics,
        pools: Sequence[WorkerPool],
        every: float = 0.1,
    ) -> None:
        self.path = path
        self.name = name
        self.mirror = mirror
        self.reports = reports
        self.metrics = metrics
        self.pools = tuple(pools)
        self.every = every
        self.lost: Callable[[], None] = lambda: None  # the control process is gone
        # what takes the other messages, by their "t"
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self, timeout: float = 60.0) -> None:
        """Connect, say hello, and take what comes up to the first snapshot (the process serves
        only then)."""
        reader, self._writer = await asyncio.open_unix_connection(self.path)
        await send_message(self._writer, {"t": "hello", "name": self.name, "pid": os.getpid()})
        async with asyncio.timeout(timeout):
            while self._apply(await read_message(reader)) != "snapshot":
                pass
        self._tasks = [
            asyncio.create_task(self._receive(reader)),
            asyncio.create_task(self._report()),
        ]

    def _apply(self, message: dict[str, Any]) -> object:
        kind = message.get("t")
        if kind == "snapshot":
            settled = self.reports.breakers_settled(int(message.get("ack", 0)))
            self.mirror.apply(message["workers"], settled)
        else:
            handler = self.handlers.get(str(kind))
            if handler is not None:
                handler(message)
        return kind

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._apply(await read_message(reader))
        except ChannelClosed as exc:
            self._gone(str(exc))
        except Exception as exc:  # a message it cannot take: stale routing is worse than a restart
            log.exception("a message from the control process could not be applied")
            self._gone(repr(exc))

    async def _report(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.every)
                await self.flush()
        except ChannelClosed as exc:
            self._gone(str(exc))

    async def flush(self) -> None:
        """Send what happened since the last report, if anything did."""
        report = self.reports.take(self.metrics, self.pools, self.mirror.changed_at)
        if report is not None and self._writer is not None:
            await send_message(self._writer, report)

    def _gone(self, why: str) -> None:
        if not self._closing:
            self._closing = True
            log.warning("the control process closed the channel (%s): draining", why)
            self.lost()

    async def close(self) -> None:
        """Send the last report (the requests that finished while draining), then hang up."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(ChannelClosed, OSError):
                await self.flush()
            self._writer.close()
