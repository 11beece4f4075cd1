"""The exact prefix index (proxy.place.kvindex) with `workers` > 1: one index, replicated.

The control process subscribes to the engines' KV-cache events as in one process
(proxy.control.kvevents: one subscriber per engine, batches in order, gaps repaired through the
engine's replay socket, a lost connection forgotten); its index is a `PublishedIndex`, which sends
every change it takes, in the order it takes them, to every serving process over its channel:

    {"t": "kv", "op": "apply", "url", "events": <base64 msgpack of the events>}
    {"t": "kv", "op": "clear" | "forget", "url"}

and a serving process (`Replica`) applies them to its planner's index. A serving process that
connects (at start, after a restart) first gets the whole index (`state`: "reset", then each
engine's blocks, in chunks), before its first snapshot of the workers, so it never serves without
it. A channel too far behind (MAX_BUFFERED) gets no change until it has drained, then the whole
index again. So every process plans from the same index, built from one subscription per engine
(an engine whose PUB socket connects to the proxy, `kv_events.bind`, works as in one process), and
`GET /admin/prefix-index` (the control process's) describes what every serving process holds.
Which index answers for a worker (`prefix_source`) comes with the snapshot of the workers.

Why not a subscriber in every serving process: a bound address has one owner, and a process
started again later would learn what an engine holds only from a replay buffer that may no longer
reach back to its first batch: the processes' views would differ.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

from proxy.engines.kvevents_wire import BlockHash, Event
from proxy.place.kvindex import EngineBlocks, KvIndex
from proxy.procs.channel import MAX_BUFFERED, frame

KV = "kv"  # the channel message
CHUNK = 50_000  # blocks per message of the whole index

_ENCODER = msgspec.msgpack.Encoder()
_EVENTS = msgspec.msgpack.Decoder(list[Event])
_ENTRIES = msgspec.msgpack.Decoder(list[tuple[BlockHash, int, int]])


def _pack(value: object) -> str:
    return base64.b64encode(_ENCODER.encode(value)).decode()


class PublishedIndex(KvIndex):
    """The control process's index: each change is also handed to `publish`."""

    def __init__(self, publish: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self.publish = publish

    def apply(self, url: str, events: Iterable[Event]) -> None:
        events = list(events)
        super().apply(url, events)
        self.publish({"t": KV, "op": "apply", "url": url, "events": _pack(events)})

    def clear(self, url: str) -> None:
        super().clear(url)
        self.publish({"t": KV, "op": "clear", "url": url})

    def forget(self, url: str) -> None:
        super().forget(url)
        self.publish({"t": KV, "op": "forget", "url": url})


def state(index: KvIndex) -> Iterator[dict[str, Any]]:
    """The whole index as messages: a reset, then each engine's blocks."""
    yield {"t": KV, "op": "reset"}
    for url, blocks in index.engines.items():
        entries = [(h, key, blocks.copies[h]) for h, key in blocks.keys.items()]
        for start in range(0, max(1, len(entries)), CHUNK):
            yield {
                "t": KV, "op": "blocks", "url": url, "first": start == 0,
                "block_size": blocks.block_size, "skipped": blocks.skipped,
                "removed": blocks.removed, "entries": _pack(entries[start : start + CHUNK]),
            }  # fmt: skip


class IndexPublisher:
    """The control process's side: the published index, and what each channel has been sent."""

    def __init__(self, writers: Callable[[], dict[str, asyncio.StreamWriter]]) -> None:
        self.writers = writers  # the connected serving processes' channels, by name
        self.index = PublishedIndex(self.publish)
        self.behind: set[str] = set()  # channels that missed a change: the whole index next

    def publish(self, message: dict[str, Any]) -> None:
        data = frame(message)
        for name, writer in self.writers().items():
            if name in self.behind:
                continue
            if writer.transport.get_write_buffer_size() > MAX_BUFFERED:
                self.behind.add(name)
                continue
            writer.write(data)

    def joined(self, name: str, writer: asyncio.StreamWriter) -> None:
        """A serving process connected (or caught up): the whole index, from scratch."""
        self.behind.discard(name)
        for message in state(self.index):
            writer.write(frame(message))

    def catch_up(self) -> None:
        """The whole index to each channel that missed a change and has drained since."""
        writers = self.writers()
        for name in list(self.behind):
            writer = writers.get(name)
            if writer is None:
                self.behind.discard(name)  # it gets the whole index when it connects again
            elif writer.transport.get_write_buffer_size() < MAX_BUFFERED // 2:
                self.joined(name, writer)


class Replica:
    """A serving process's side: the control process's changes, applied to its planner's index."""

    def __init__(self, index: KvIndex) -> None:
        self.index = index

    def take(self, message: dict[str, Any]) -> None:
        op, url = message["op"], message.get("url", "")
        if op == "apply":
            self.index.apply(url, _EVENTS.decode(base64.b64decode(message["events"])))
        elif op == "clear":
            self.index.clear(url)
        elif op == "forget":
            self.index.forget(url)
        elif op == "reset":
            self.index.engines.clear()
        elif op == "blocks":
            self._blocks(url, message)

    def _blocks(self, url: str, message: dict[str, Any]) -> None:
        blocks = self.index.engines.get(url)
        if message["first"] or blocks is None:
            blocks = self.index.engines[url] = EngineBlocks(message["block_size"])
            blocks.skipped, blocks.removed = message["skipped"], message["removed"]
        for engine_hash, key, copies in _ENTRIES.decode(base64.b64decode(message["entries"])):
            blocks.keys[engine_hash] = key
            blocks.copies[engine_hash] = copies
            blocks.held[key] = blocks.held.get(key, 0) + 1
