"""The prefiller side of LMCache PD (``pd_role: sender``): a request with a ``disagg_spec``
pushes its prompt's chunks to the receiver named there, then each TP rank sends LMCache's
``ProxyNotif`` to the proxy over ZMQ PUSH.

The save runs inside the engine step that computed the prompt (vLLM's ``wait_for_save``): it
copies every chunk into the rank's staging buffer, waiting for staging pages if need be, and
the whole engine waits with it. The push itself runs in the background: it asks the receiver
for pages (which may wait as long as the receiver's buffer is full), writes, frees the staging
pages and notifies. So a receiver with no room first holds back notifications, and once the
pushes waiting on it fill the staging buffer, the next save stops the prefiller's engine: no
response, no notification, while ``/health`` still answers 200 (LMCache 0.5.0, issue 23).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import zmq
import zmq.asyncio

from pdsim.config import Timing
from pdsim.engine import Sequence
from pdsim.lmcache.buffer import PageBuffer
from pdsim.lmcache.chunks import chunk_keys
from pdsim.lmcache.config import LMCacheSimConfig, Switches
from pdsim.lmcache.stats import LMCacheStats
from pdsim.lmcache.wire import encode_proxy_notif
from pdsim.shape import BLOCK_SIZE

log = logging.getLogger(__name__)

# the receiver answers an allocation when it has room: wait as long as it does
_ALLOC_WAIT = aiohttp.ClientTimeout(total=None, sock_connect=10)


@dataclass(frozen=True)
class _Push:
    req_id: str
    host: str
    init_ports: tuple[int, ...]
    alloc_ports: tuple[int, ...]
    prompt_ids: list[int]
    ret_first_tok: bool


def _push_spec(kv: dict[str, Any], prompt_ids: list[int]) -> _Push | None:
    spec = kv.get("disagg_spec")
    if not isinstance(spec, dict):
        return None
    try:
        return _Push(
            str(spec["req_id"]),
            str(spec["receiver_host"]),
            tuple(int(p) for p in spec["receiver_init_port"]),
            tuple(int(p) for p in spec["receiver_alloc_port"]),
            prompt_ids,
            bool(kv.get("ret_first_tok")),
        )
    except (KeyError, TypeError, ValueError):
        log.warning("Ignoring malformed disagg_spec %s", spec)
        return None


class Sender:
    """The prefiller side: pushes KV chunks, then notifies the proxy once per TP rank."""

    def __init__(
        self,
        config: LMCacheSimConfig,
        timing: Timing,
        stats: LMCacheStats,
        session: aiohttp.ClientSession,
    ) -> None:
        self._config = config
        self._timing = timing
        self._stats = stats
        self._session = session
        self.switches = config.switches
        self._drop_left = self.switches.drop_next
        self._context = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []
        for _ in range(config.tp):  # one PUSH socket per TP rank, as each LMCache worker has
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{config.proxy_host}:{config.proxy_port}")
            self._sockets.append(sock)
        self._greeted: set[tuple[str, int]] = set()
        self._pending: weakref.WeakKeyDictionary[Sequence, _Push] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        # per TP rank, the staging buffer a save copies the chunks into until they are pushed
        self.staging = [
            PageBuffer(config.buffer_chunks, config.allocation_timeout) for _ in range(config.tp)
        ]

    def set_switches(self, switches: Switches) -> None:
        self.switches = switches
        self._drop_left = switches.drop_next

    def on_submit(self, seq: Sequence, kv: dict[str, Any]) -> None:
        push = _push_spec(kv, seq.prompt_ids)
        if push is not None:
            self._pending[seq] = push

    def on_prefilled(self, seq: Sequence) -> Coroutine[Any, Any, None] | None:
        """The engine computed this prompt: its save, which the engine step awaits (vLLM's
        wait_for_save), or None when the request pushes nothing."""
        push = self._pending.get(seq)
        if push is None:
            return None
        keys = chunk_keys(push.prompt_ids, self._config.chunk_size, self._config.save_unfull_chunk)
        if not keys:
            self._stats.unsaved_requests += 1
            log.info("Request %s saved no full chunk: no KV pushed, no notification", push.req_id)
            return None
        drop = self.switches.drop_notifications or self._drop_left > 0
        if self._drop_left > 0:
            self._drop_left -= 1
        return self._save(push, [k for k, _ in keys], drop)

    async def _save(self, push: _Push, keys: list[int], drop: bool) -> None:
        """Stage the chunks on every rank, waiting for staging pages (the engine waits with
        it), then push and notify in the background."""
        for rank, staging in enumerate(self.staging):
            if len(keys) > staging.total:  # could never fit: the sim fails it rather than hang
                self._stats.push_failures += 1
                log.error(
                    "KV save of %s: %d chunks exceed the staging buffer's %d",
                    push.req_id,
                    len(keys),
                    staging.total,
                )
                continue
            if not await staging.take_all(len(keys)):
                self._stats.push_failures += 1
                log.error("KV save of %s: no staging room on TP rank %d", push.req_id, rank)
                continue
            self._spawn(self._push_rank(push, rank, keys, drop))

    def on_finished(self, seq: Sequence) -> None:
        """The response is being built: answer the first token (``ret_first_tok``)."""
        push = self._pending.pop(seq, None)
        if push is not None and push.ret_first_tok and seq.gen.token_ids:
            seq.kv_transfer_params = {"first_tok": seq.gen.token_ids[0]}

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_rank(self, push: _Push, rank: int, keys: list[int], drop: bool) -> None:
        """Push one rank's staged chunks; the staging pages go back when it is over."""
        try:
            pushed = await self._write(push, rank, keys)
        finally:
            self.staging[rank].give(len(keys))
        if not pushed:
            self._stats.push_failures += 1
            return
        if rank == 0:
            self._stats.pushed_requests += 1
        await self._notify(push.req_id, rank, drop)

    async def _write(self, push: _Push, rank: int, keys: list[int]) -> bool:
        """Allocate the chunks in the receiver's buffer (waiting as long as it does), then
        write them."""
        t = self._timing
        try:
            host, init, alloc = push.host, push.init_ports[rank], push.alloc_ports[rank]
        except IndexError:
            log.error("disagg_spec of %s has no ports for TP rank %d", push.req_id, rank)
            return False
        try:
            if (host, init) not in self._greeted:
                async with self._session.post(f"http://{host}:{init}/lmcache/init") as resp:
                    resp.raise_for_status()
                self._greeted.add((host, init))
            payload = orjson.dumps({"req_id": push.req_id, "keys": keys})
            url = f"http://{host}:{alloc}/lmcache/put"
            async with self._session.post(url, data=payload, timeout=_ALLOC_WAIT) as r:
                r.raise_for_status()
            if t.enabled:
                tokens = len(push.prompt_ids)
                ms = t.xfer_overhead_ms + t.xfer_ms_per_block * tokens / BLOCK_SIZE
                await asyncio.sleep(ms * t.speed_factor / 1000.0)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.error("KV push of %s to %s:%d failed: %s", push.req_id, host, alloc, e)
            return False
        return True

    async def _notify(self, req_id: str, rank: int, drop: bool) -> None:
        switches = self.switches
        if drop or rank in switches.drop_ranks:
            self._stats.notifications_dropped += 1
            return
        if switches.delay_notifications > 0:
            await asyncio.sleep(switches.delay_notifications)
        try:
            await self._sockets[rank].send(encode_proxy_notif(req_id), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._stats.notifications_dropped += 1
            log.warning("Proxy notification for %s dropped: nobody is listening", req_id)
            return
        self._stats.notifications_sent += 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self._sockets:
            sock.close(linger=0)
        self._context.term()
