"""One subscriber per engine to its KV-cache events (proxy.engines.kvevents_wire), feeding the
exact prefix index (proxy.place.kvindex).

Each batch carries a sequence number from 0 at the engine's start. The subscriber applies
batches in order, once each:

- on connecting, it asks the engine's replay socket for every batch from 0 (a proxy that
  joins late, or a second replica, learns what the engine already holds even if it publishes
  nothing more for a while);
- the first batch it sees, if not the next one (no replay was answered, or ZMQ's
  subscription was not through yet), and any later jump in the numbers (batches dropped at
  the high-water mark) are repaired through the engine's replay socket: the batches from the
  first missing one on, each applied once (those that also arrive on the subscription are skipped);
- a repair that cannot be made (no replay socket, no answer within `replay_timeout`, or the
  engine's buffer no longer reaches back far enough) empties the engine's entries: missing a
  removal would make the index claim blocks the engine no longer has, missing a store only
  costs hits, so the index starts over from what it sees next;
- a lost connection (the engine stopped or restarted: its cache is gone) drops them, and the
  engine keeps the estimate until it is connected again; then it holds what the replay from
  0 says (nothing for an engine that restarted, all its entries for one that did not).

`Worker.prefix_source` says which index the planner uses for the worker: "events" while its
subscriber is connected (the index answers for it only then), else "estimate"
(proxy.place.prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from proxy.control.workers import Worker
from proxy.engines.kvevents_wire import (
    WireError,
    decode_batch,
    replayed_frame,
    seq_bytes,
    seq_of,
)
from proxy.place.kvindex import KvIndex

log = logging.getLogger("pdproxy")


@dataclass(frozen=True, slots=True)
class Endpoints:
    publisher: str  # the engine's PUB socket, tcp://host:port
    replay: str | None  # its ROUTER socket for replays, if it has one
    bind: bool = False  # the proxy binds `publisher` and the engine's PUB connects to it


@dataclass
class Counts:
    batches: int = 0
    duplicates: int = 0
    repaired: int = 0  # gaps closed through the replay socket
    lost: int = 0  # gaps that could not be closed, and lost connections
    stale: int = 0  # batches read after their connection went: an engine that left


class Subscriber:
    """Applies one engine's batches to the index, in order, repairing gaps."""

    def __init__(
        self,
        worker: Worker,
        endpoints: Endpoints,
        index: KvIndex,
        context: zmq.asyncio.Context,
        topic: str = "",
        replay_timeout: float = 5.0,
    ) -> None:
        self.worker = worker
        self.endpoints = endpoints
        self.index = index
        self.context = context
        self.topic = topic.encode()
        self.replay_timeout = replay_timeout
        self.expected: int | None = None  # the next batch's number; None: start over
        self.connected = False
        self.counts = Counts()

    @property
    def url(self) -> str:
        return self.worker.url

    async def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        monitor = sub.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        )
        if self.endpoints.bind:
            sub.bind(self.endpoints.publisher)
        else:
            sub.connect(self.endpoints.publisher)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    message = parse_monitor_message(await monitor.recv_multipart())
                    if self.on_monitor(message) and self.endpoints.replay:
                        await self.catch_up()
                if sub in ready:
                    await self.on_message(await sub.recv_multipart())
        finally:
            self.worker.prefix_source = "estimate"
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    def on_monitor(self, message: Mapping[str, object]) -> bool:
        """Follow the connection; True when it is (re)connected."""
        if message["event"] in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
            log.info("KV events of %s: connected at %s", self.url, self.endpoints.publisher)
            self.index.apply(self.url, ())  # exact from now on: nothing until events say so
            self.worker.prefix_source = "events"
            # a new connection may be a restarted engine, whose numbers start again at 0:
            # what came before (even a batch of the old engine read after it left) is no guide
            self.expected = None
            self.connected = True
            return True
        if message["event"] == zmq.EVENT_DISCONNECTED:
            log.info("KV events of %s: disconnected; it keeps the estimate", self.url)
            self.connected = False
            self.index.forget(self.url)
            self.worker.prefix_source = "estimate"
            self.expected = None
            self.counts.lost += 1
        return False

    async def catch_up(self) -> None:
        """On connecting, what the engine published before: its replay buffer from batch 0,
        so that a proxy joining an engine that publishes nothing more for a while still knows
        what it holds. Without an answer the next batch is repaired instead (`expected` stays
        None); a buffer that no longer reaches back to 0 leaves the engine empty, as a gap that
        cannot be repaired does."""
        replayed = await self.replay(0)
        if replayed is None:
            return
        if replayed and replayed[0][0] != 0:
            log.warning(
                "KV events of %s: its replay buffer starts at batch %d, not 0; it holds "
                "nothing here until its events say so",
                self.url, replayed[0][0],
            )  # fmt: skip
            self.counts.lost += 1
            self.expected = replayed[-1][0] + 1
            return
        self._apply_replayed(0, replayed)
        if replayed:
            self.counts.repaired += 1

    def lose(self) -> None:
        """What the engine holds is unknown now: hold nothing, start over at the next batch."""
        self.index.clear(self.url)
        self.expected = None
        self.counts.lost += 1

    async def on_message(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 3:
                raise WireError(f"{len(frames)} frames, not 3 (topic, sequence, batch)")
            seq = seq_of(frames[1])
            if not self.connected:  # queued before its engine left: that engine is gone
                self.counts.stale += 1
                return
            if self.expected is None or seq > self.expected:
                await self.repair(0 if self.expected is None else self.expected, seq)
            if self.expected is not None and seq < self.expected:
                self.counts.duplicates += 1
                return
            self.apply(seq, frames[2])
        except WireError as exc:
            log.warning("KV events of %s: %s; its entries are dropped", self.url, exc)
            self.lose()

    def apply(self, seq: int, payload: bytes) -> None:
        self.index.apply(self.url, decode_batch(payload).events)
        self.expected = seq + 1
        self.counts.batches += 1

    async def repair(self, start: int, seen: int) -> None:
        """Apply batches `start`.. from the replay socket; `seen` has arrived already. Without
        them, the engine's entries are dropped and `seen` is where the sequence restarts."""
        if seen == start:
            self.expected = start
            return
        replayed = await self.replay(start) if self.endpoints.replay else None
        if replayed is None or not replayed or replayed[0][0] != start:
            log.warning(
                "KV events of %s: batches %d to %d are missing and could not be replayed; "
                "its entries are dropped",
                self.url, start, seen - 1,
            )  # fmt: skip
            self.index.clear(self.url)
            self.counts.lost += 1
            self.expected = seen
            return
        self._apply_replayed(start, replayed)
        self.counts.repaired += 1

    def _apply_replayed(self, start: int, replayed: list[tuple[int, bytes]]) -> None:
        """The replayed batches from `start` on, in order, each once."""
        self.expected = start
        for seq, payload in replayed:
            if seq == self.expected:
                self.apply(seq, payload)

    async def replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """The engine's kept batches from `start` on; None if it does not answer in time."""
        assert self.endpoints.replay is not None
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoints.replay)
        out: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(self.replay_timeout):
                await sock.send_multipart((b"", seq_bytes(start)))
                while True:
                    batch = replayed_frame(await sock.recv_multipart())
                    if batch is None:
                        return out
                    out.append(batch)
        except TimeoutError:
            log.warning("KV events of %s: no replay from %s", self.url, self.endpoints.replay)
            return None
        except WireError as exc:
            log.warning("KV events of %s: its replay answered %s", self.url, exc)
            return None
        finally:
            sock.close(linger=0)


def _ended(url: str, task: asyncio.Task[None]) -> None:
    """A subscriber that stopped on an error says so: its engine is back on the estimate."""
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "KV events of %s: the subscriber stopped (%r); the engine keeps the estimate",
            url, task.exception(),
        )  # fmt: skip


class KvEvents:
    """The subscribers of every worker that has events; started and stopped with the control
    plane, and with workers joining and leaving."""

    def __init__(self, index: KvIndex, topic: str, replay_timeout: float) -> None:
        self.index = index
        self.topic = topic
        self.replay_timeout = replay_timeout
        self.context = zmq.asyncio.Context()
        self.running: dict[str, tuple[Subscriber, asyncio.Task[None]]] = {}

    def start(self, worker: Worker, endpoints: Endpoints) -> Subscriber:
        sub = Subscriber(
            worker, endpoints, self.index, self.context, self.topic, self.replay_timeout
        )
        task = asyncio.create_task(sub.run(), name=f"kv-events {worker.url}")
        task.add_done_callback(functools.partial(_ended, worker.url))
        self.running[worker.url] = (sub, task)
        return sub

    def describe(self) -> dict[str, dict[str, object]]:
        """Per engine: the index it answers from, what the index holds for it, and how its
        subscriber fared (GET /admin/prefix-index)."""
        out: dict[str, dict[str, object]] = {}
        for url, (sub, _) in self.running.items():
            blocks = self.index.engines.get(url)
            out[url] = {
                "prefix_source": sub.worker.prefix_source,
                "publisher": sub.endpoints.publisher,
                "bind": sub.endpoints.bind,
                "next_seq": sub.expected,
                **dataclasses.asdict(sub.counts),
                "blocks": None if blocks is None else len(blocks.held),
                "block_size": None if blocks is None else blocks.block_size,
                "digest": None if blocks is None else blocks.digest(),
            }
        return out

    async def stop(self, url: str) -> None:
        entry = self.running.pop(url, None)
        if entry is not None:
            entry[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry[1]
        self.index.forget(url)

    async def close(self) -> None:
        for url in list(self.running):
            await self.stop(url)
        self.context.term()
