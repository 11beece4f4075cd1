"""The "transfer done" channel of LMCache PD: a ZMQ PULL socket and the requests waiting on it.

Each LMCache prefiller connects a PUSH socket to the address its YAML names
(`pd_proxy_host:pd_proxy_port`) and sends one `ProxyNotif(req_id)` per TP rank once a request's
KV is written into the decoder. `Notifications` binds that address, reads messages in one task,
and wakes the request that waits for them.

Invariants (state stays bounded whatever the engines send):
- a waiter exists only inside `expect(...)`; it is removed in `finally`, whether the request
  finished, timed out, failed, or its client left;
- a notification for an id nobody waits for is dropped and counted: `late` when the id belongs
  to a request that ended before all its notifications came (the last `late_memory` such ids
  are remembered, no more), `unknown` otherwise; one that is not a ProxyNotif is `malformed`;
- nothing here waits without a deadline: `Waiter.wait` is always called under a timeout by the
  connector, and the reader task ends when the socket closes.

With `workers` > 1 the socket is the control process's: `relay` passes each notification whose
id names a serving process to it (proxy.procs.notify), which takes it in with `note` and binds
nothing (`listen` False). In one process both stay as they are: nothing is relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.engines.connectors.lmcache_wire import MalformedNotification, decode

log = logging.getLogger("pdproxy")


class Waiter:
    """Counts the notifications one request still needs."""

    __slots__ = ("_done", "needed", "received")

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.received = 0
        self._done = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.received >= self.needed

    def note(self) -> None:
        self.received += 1
        if self.complete:
            self._done.set()

    async def wait(self) -> None:
        """Return once every notification came. Callers bound this with a timeout."""
        await self._done.wait()


class NotifyMetrics:
    """The channel's counters, registered in the proxy's own registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.received = Counter(
            "pdproxy_lmcache_notifications",
            "LMCache ProxyNotif messages received, by what became of them "
            "(matched, extra, late, unknown, malformed)",
            ["result"],
            registry=registry,
        )
        self.timeouts = Counter(
            "pdproxy_lmcache_notify_timeouts",
            "requests whose KV-transfer notifications missed the deadline, by the action taken "
            "(error: 504 to the client; fallback: the decoder recomputed)",
            ["action"],
            registry=registry,
        )
        self.waiting = Gauge(
            "pdproxy_lmcache_waiting_requests",
            "requests waiting for LMCache transfer notifications now",
            registry=registry,
        )
        self.remembered = Gauge(
            "pdproxy_lmcache_remembered_ids",
            "ended request ids remembered to recognise late notifications (bounded)",
            registry=registry,
        )


class Notifications:
    """Binds the PULL socket (`start`) and routes each ProxyNotif to its waiter."""

    def __init__(
        self, host: str, port: int, late_memory: int, registry: CollectorRegistry | None
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = NotifyMetrics(registry)
        self._late_memory = late_memory
        self._waiters: dict[str, Waiter] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self.listen = True  # False in a serving process: the control process owns the socket
        # the control process (workers > 1): passes an id on to the serving process that waits
        # for it, True when it did (proxy.procs.notify)
        self.relay: Callable[[str], bool] | None = None
        self.metrics.waiting.set_function(lambda: len(self._waiters))
        self.metrics.remembered.set_function(lambda: len(self._ended))

    def __repr__(self) -> str:
        return (
            f"<Notifications tcp://{self.host}:{self.port} waiting={len(self._waiters)} "
            f"remembered={len(self._ended)}>"
        )

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def remembered(self) -> int:
        return len(self._ended)

    async def start(self) -> None:
        """Bind the socket (port 0 picks a free one, then `port` tells which) and start reading."""
        if not self.listen:
            return
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close()
            self._context.term()
            self._context = None
            raise OSError(
                f"cannot bind the LMCache notification socket tcp://{self.host}:{self.port}: "
                f"{exc} (is another proxy using it? set lmcache.notify_port)"
            ) from None
        self._socket = sock
        self._reader = asyncio.create_task(self._read(sock), name="lmcache-notifications")
        log.info("LMCache notifications: listening on tcp://%s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    @contextlib.contextmanager
    def expect(self, req_id: str, count: int) -> Iterator[Waiter]:
        """Register a waiter for `count` notifications of `req_id` while inside the block."""
        if req_id in self._waiters:
            raise ValueError(f"LMCache request id {req_id} is already waited for")
        waiter = Waiter(count)
        self._waiters[req_id] = waiter
        try:
            yield waiter
        finally:
            del self._waiters[req_id]
            if not waiter.complete:
                self._remember(req_id)

    def deliver(self, raw: bytes) -> str:
        """Route one received message; returns what became of it (the metric label, or
        `relayed`: passed on to a serving process, which counts it)."""
        try:
            req_id = decode(raw)
        except MalformedNotification as exc:
            result = "malformed"
            log.warning(
                "LMCache notifications: dropped a message that is not a ProxyNotif: %s", exc
            )
        else:
            if self.relay is not None and self.relay(req_id):
                return "relayed"  # counted by the process that takes it
            result = self._match(req_id)
        self.metrics.received.labels(result).inc()
        return result

    def note(self, req_id: str) -> str:
        """A notification the control process relayed (workers > 1): as `deliver`."""
        result = self._match(req_id)
        self.metrics.received.labels(result).inc()
        return result

    def _match(self, req_id: str) -> str:
        waiter = self._waiters.get(req_id)
        if waiter is not None:
            result = "extra" if waiter.complete else "matched"
            waiter.note()
        elif req_id in self._ended:
            result = "late"
            self._ended.move_to_end(req_id)
            log.info("LMCache notifications: late notification for ended request %s", req_id)
        else:
            result = "unknown"
            log.info("LMCache notifications: dropped notification for unknown id %s", req_id)
        return result

    def _remember(self, req_id: str) -> None:
        self._ended[req_id] = None
        self._ended.move_to_end(req_id)
        while len(self._ended) > self._late_memory:
            self._ended.popitem(last=False)

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                log.warning("LMCache notifications: receive failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            for frame in frames:
                self.deliver(frame)
