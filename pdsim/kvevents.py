"""The engine's KV-cache events (vLLM ``--kv-events-config``), in vLLM's wire format
(proxy.engines.kvevents_wire): a PUB socket with one message per batch (topic, sequence number,
msgpack batch) and a ROUTER socket that replays the last ``buffer_steps`` batches.

The prefix cache (pdsim.prefixcache) reports its stores and evictions; they are published as
one batch per call, as vLLM publishes one per scheduler step. Block hashes are the cache's
content hashes as 64-bit ints (vLLM's VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES form).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from proxy.engines.kvevents_wire import (
    END_SEQ,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    encode_batch,
    seq_bytes,
)

log = logging.getLogger("pdsim")
MASK = (1 << 64) - 1


@dataclass(frozen=True)
class KvEventsConfig:
    """The part of vLLM's KVEventsConfig the simulator reads."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    topic: str = ""
    # the replay's answers as vLLM 0.32 frames them (with the topic), or as vLLM 0.24 (without)
    replay_topic_frame: bool = True

    @classmethod
    def parse(cls, text: str) -> KvEventsConfig | None:
        """The flag's JSON; None when events are off. ValueError says what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        if not data.get("enable_kv_cache_events") or data.get("publisher", "zmq") == "null":
            return None
        if data.get("publisher", "zmq") != "zmq":
            raise ValueError(f"unknown KV event publisher {data['publisher']!r}")
        known = {"endpoint", "replay_endpoint", "buffer_steps", "topic"}
        return cls(**{k: v for k, v in data.items() if k in known})


def stored(hashes: list[int], parent: int | None, tokens: list[int], size: int) -> BlockStored:
    return BlockStored(
        block_hashes=[h & MASK for h in hashes],
        parent_block_hash=None if parent is None else parent & MASK,
        token_ids=tokens,
        block_size=size,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        group_idx=0,
    )


def removed(hashes: list[int]) -> BlockRemoved:
    return BlockRemoved(block_hashes=[h & MASK for h in hashes], medium="GPU", group_idx=0)


def binds(endpoint: str) -> bool:
    """vLLM's rule for the PUB socket: bind a wildcard address (tcp://*:port, ::) or an ipc://
    or inproc:// path, so that any number of subscribers connect; connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    """Publishes batches with sequence numbers from 0 and serves replays."""

    def __init__(self, config: KvEventsConfig) -> None:
        self.config = config
        self._context = zmq.asyncio.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        if binds(config.endpoint):
            self._pub.bind(config.endpoint)
        else:  # a subscriber bound there
            self._pub.connect(config.endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        if config.replay_endpoint:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
        self._topic = config.topic.encode()
        self._replay_topic = (self._topic,) if config.replay_topic_frame else ()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next = 0
        self._server = asyncio.create_task(self._serve_replays()) if self._replay else None

    @property
    def endpoints(self) -> tuple[str, str | None]:
        """Where it is bound (a port of 0 in the config is a free one)."""
        pub = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        replay = self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay else None
        return pub, replay

    def publish(self, events: list[Event], send: bool = True) -> int:
        """One batch; its sequence number. `send=False` keeps it for replay only, as a batch
        dropped at the high-water mark is (tests)."""
        seq = self._next
        self._next += 1
        payload = encode_batch(EventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        self._buffer.append((seq, payload))
        if send:
            self._pub.send_multipart((self._topic, seq_bytes(seq), payload))
        return seq

    async def _serve_replays(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("KV events: a replay request in %d frames, not 3", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart(
                        (client, b"", *self._replay_topic, seq_bytes(seq), payload)
                    )
            end = (b"",) if self._replay_topic else ()
            await self._replay.send_multipart((client, b"", *end, END_SEQ, b""))

    async def close(self) -> None:
        if self._server is not None:
            self._server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._context.term()
