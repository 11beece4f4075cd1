"""LMCache PD mode of the simulated engine (LMCacheConnectorV1 with `enable_pd`).

Sender (prefiller, LMCache `pd_role: sender`): a request whose `kv_transfer_params` carries a
`disagg_spec` pushes its prompt's KV chunks, once prefilled, to the receiver named there: TP rank
r writes to `receiver_host:receiver_alloc_port[r]` (after a one-time hello on
`receiver_init_port[r]`), then sends LMCache's real `ProxyNotif(req_id)` wire message over ZMQ PUSH
to `pd_proxy_host:pd_proxy_port`. With `ret_first_tok` the response carries
`kv_transfer_params: {"first_tok": <id>}`. In PD mode LMCache saves the partial last chunk too
(`save_unfull_chunk`, forced on by PD since 0.3.11), so every prompt notifies; LMCache 0.3.12 to
0.4.1 lost that (LMCache #2510): they save full chunks only, and a prompt shorter than one chunk
pushes nothing and never notifies. `save_unfull_chunk=False` (`--lmcache-discard-partial-chunks`)
gives that behaviour, as `discard_partial_chunks: true` does in any version.

Receiver (decoder, `pd_role: receiver`): TP rank r listens on init port r and alloc port r and
keeps what was pushed in a bounded store keyed by chunk hash. A request is served from pushed KV
when every rank holds its leading chunks (counted as a hit); otherwise it recomputes (counted).

The sim's own transfer channel is HTTP (not NIXL): `POST /lmcache/init` on an init port and
`POST /lmcache/put {"req_id", "keys"}` on an alloc port. Switches for tests (`POST /_sim/lmcache`)
drop or delay notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson
import pydantic
import zmq
import zmq.asyncio
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from pdsim.config import BLOCK_SIZE, Timing
from pdsim.engine import Sequence
from pdsim.metrics import Metrics
from pdsim.nixl import KvLoad
from proxy.engines.connectors.lmcache_wire import encode

log = logging.getLogger(__name__)

LMCacheRole = Literal["sender", "receiver"]
DEFAULT_CHUNK_SIZE = 256  # LMCache chunk_size
STORE_LIMIT = 200_000  # chunk keys kept per receiver rank


class Switches(BaseModel):
    """Test switches, as posted to `POST /_sim/lmcache` (replaces the whole set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_notifications: bool = Field(False, description="never send ProxyNotif")
    drop_next: int = Field(0, ge=0, description="drop the notifications of the next N requests")
    drop_ranks: tuple[int, ...] = Field((), description="TP ranks that never notify")
    delay_notifications: float = Field(0.0, ge=0, description="seconds before each notification")


@dataclass(frozen=True)
class LMCacheSimConfig:
    role: LMCacheRole
    tp: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    proxy_host: str = "127.0.0.1"  # sender: pd_proxy_host
    proxy_port: int = 7500  # sender: pd_proxy_port
    peer_host: str = "127.0.0.1"  # receiver: pd_peer_host (where it listens)
    init_ports: tuple[int, ...] = (7300,)  # receiver: pd_peer_init_port, one per TP rank
    alloc_ports: tuple[int, ...] = (7400,)  # receiver: pd_peer_alloc_port, one per TP rank
    save_unfull_chunk: bool = True  # sender: False = full chunks only (LMCache 0.3.12-0.4.1)
    switches: Switches = field(default_factory=Switches)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.chunk_size < 1:
            raise ValueError("--tp and --lmcache-chunk-size must be at least 1")
        if self.role == "receiver" and not (
            len(self.init_ports) == len(self.alloc_ports) == self.tp
        ):
            raise ValueError(
                f"a receiver with --tp {self.tp} needs {self.tp} init and {self.tp} alloc ports"
            )


def chunk_keys(
    token_ids: list[int], chunk_size: int, save_unfull: bool = True
) -> list[tuple[int, int]]:
    """(key, tokens) of each chunk: full chunks, then the partial last one unless `save_unfull`
    is off; key i is a hash chained over every token up to its end. Without `save_unfull` a
    prompt shorter than one chunk saves nothing (LMCache 0.3.12-0.4.1, #2510)."""
    end = len(token_ids) if save_unfull else len(token_ids) - len(token_ids) % chunk_size
    out: list[tuple[int, int]] = []
    prev = 0
    for start in range(0, end, chunk_size):
        chunk = token_ids[start : min(start + chunk_size, end)]
        prev = hash((prev, *chunk))
        out.append((prev, len(chunk)))
    return out


@dataclass
class LMCacheStats:
    pushed_requests: int = 0
    unsaved_requests: int = 0
    push_failures: int = 0
    notifications_sent: int = 0
    notifications_dropped: int = 0
    received_chunks: int = 0
    hit_requests: int = 0
    loaded_tokens: int = 0
    missed_requests: int = 0

    def render(self) -> str:
        out = []
        for name, doc in _STAT_DOCS.items():
            metric = f"pdsim:lmcache_{name}"
            out += [f"# HELP {metric} {doc}", f"# TYPE {metric} counter"]
            out.append(f"{metric}_total {float(getattr(self, name))!r}")
        return "\n".join(out) + "\n"


_STAT_DOCS = {
    "pushed_requests": "Requests whose KV was pushed to a receiver.",
    "unsaved_requests": "Requests that saved no chunk: no push, no notification (LMCache #2510).",
    "push_failures": "KV pushes that failed (no notification).",
    "notifications_sent": "ProxyNotif messages sent.",
    "notifications_dropped": "ProxyNotif messages dropped by a switch or with no listener.",
    "received_chunks": "KV chunks received from senders.",
    "hit_requests": "Requests served from pushed KV.",
    "loaded_tokens": "Prompt tokens served from pushed KV.",
    "missed_requests": "Receiver requests that found no pushed KV (recomputed).",
}


class Receiver:
    """The decoder side: per TP rank a bounded store of pushed chunk keys."""

    def __init__(self, config: LMCacheSimConfig, stats: LMCacheStats, metrics: Metrics) -> None:
        self._config = config
        self._stats = stats
        self._metrics = metrics
        self.stores: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(config.tp)]

    def apps(self) -> list[tuple[int, web.Application]]:
        """(port, app) for every init and alloc port."""
        out = []
        for rank in range(self._config.tp):
            init = web.Application()
            init.router.add_post("/lmcache/init", self._hello)
            alloc = web.Application(client_max_size=64 * 1024 * 1024)
            alloc.router.add_post("/lmcache/put", self._put_handler(rank))
            out += [(self._config.init_ports[rank], init), (self._config.alloc_ports[rank], alloc)]
        return out

    @staticmethod
    async def _hello(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def _put_handler(self, rank: int) -> Any:
        async def put(request: web.Request) -> web.Response:
            try:
                body = orjson.loads(await request.read())
                keys = [int(k) for k in body["keys"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return web.json_response({"error": "expected {req_id, keys}"}, status=400)
            store = self.stores[rank]
            for key in keys:
                store[key] = None
                store.move_to_end(key)
            while len(store) > STORE_LIMIT:
                store.popitem(last=False)
            self._stats.received_chunks += len(keys)
            return web.json_response({"stored": len(keys)})

        return put

    def lookup(self, prompt_ids: list[int]) -> KvLoad:
        """Serve the leading chunks every rank holds; the last prompt token is recomputed."""
        covered = 0
        for key, tokens in chunk_keys(prompt_ids, self._config.chunk_size):
            if not all(key in store for store in self.stores):
                break
            covered += tokens
        loaded = min(covered, len(prompt_ids) - 1)
        if loaded <= 0:
            self._stats.missed_requests += 1
            self._metrics.recomputed_requests += 1
            return KvLoad("recomputed", failure="lmcache_miss")
        self._stats.hit_requests += 1
        self._stats.loaded_tokens += loaded
        return KvLoad("pulled", loaded_tokens=loaded)


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

    def set_switches(self, switches: Switches) -> None:
        self.switches = switches
        self._drop_left = switches.drop_next

    def on_submit(self, seq: Sequence, kv: dict[str, Any]) -> None:
        push = _push_spec(kv, seq.prompt_ids)
        if push is not None:
            self._pending[seq] = push

    def on_finished(self, seq: Sequence) -> None:
        """The prefill is done: answer the first token, and push + notify in the background."""
        push = self._pending.pop(seq, None)
        if push is None:
            return
        if push.ret_first_tok and seq.gen.token_ids:
            seq.kv_transfer_params = {"first_tok": seq.gen.token_ids[0]}
        keys = chunk_keys(push.prompt_ids, self._config.chunk_size, self._config.save_unfull_chunk)
        if not keys:
            self._stats.unsaved_requests += 1
            log.info("Request %s saved no full chunk: no KV pushed, no notification", push.req_id)
            return
        drop = self.switches.drop_notifications or self._drop_left > 0
        if self._drop_left > 0:
            self._drop_left -= 1
        for rank in range(self._config.tp):
            self._spawn(self._push_rank(push, rank, [k for k, _ in keys], drop))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_rank(self, push: _Push, rank: int, keys: list[int], drop: bool) -> None:
        t = self._timing
        try:
            host, init, alloc = push.host, push.init_ports[rank], push.alloc_ports[rank]
        except IndexError:
            self._stats.push_failures += 1
            log.error("disagg_spec of %s has no ports for TP rank %d", push.req_id, rank)
            return
        try:
            if (host, init) not in self._greeted:
                async with self._session.post(f"http://{host}:{init}/lmcache/init") as resp:
                    resp.raise_for_status()
                self._greeted.add((host, init))
            if t.enabled:
                tokens = len(push.prompt_ids)
                ms = t.xfer_overhead_ms + t.xfer_ms_per_block * tokens / BLOCK_SIZE
                await asyncio.sleep(ms * t.speed_factor / 1000.0)
            payload = orjson.dumps({"req_id": push.req_id, "keys": keys})
            async with self._session.post(f"http://{host}:{alloc}/lmcache/put", data=payload) as r:
                r.raise_for_status()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._stats.push_failures += 1
            log.error("KV push of %s to %s:%d failed: %s", push.req_id, host, alloc, e)
            return
        if rank == 0:
            self._stats.pushed_requests += 1
        await self._notify(push.req_id, rank, drop)

    async def _notify(self, req_id: str, rank: int, drop: bool) -> None:
        switches = self.switches
        if drop or rank in switches.drop_ranks:
            self._stats.notifications_dropped += 1
            return
        if switches.delay_notifications > 0:
            await asyncio.sleep(switches.delay_notifications)
        try:
            await self._sockets[rank].send(encode(req_id), flags=zmq.NOBLOCK)
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


class LMCacheMode:
    """What a sim instance runs in LMCache mode; the server calls the hooks below."""

    def __init__(self, config: LMCacheSimConfig, timing: Timing, metrics: Metrics) -> None:
        self.config = config
        self.stats = LMCacheStats()
        self._timing = timing
        self._session: aiohttp.ClientSession | None = None
        self.sender: Sender | None = None
        self.receiver = Receiver(config, self.stats, metrics) if config.role == "receiver" else None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if self.config.role == "sender":
            self.sender = Sender(self.config, self._timing, self.stats, self._session)
        if self.receiver is not None:
            for port, app in self.receiver.apps():
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                self._runners.append(runner)
                await web.TCPSite(runner, self.config.peer_host, port).start()

    async def close(self) -> None:
        if self.sender is not None:
            await self.sender.close()
            self.sender = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- hooks the server calls ------------------------------------------------------------

    def load(self, prompt_ids: list[int]) -> KvLoad | None:
        """Receiver: what the pushed KV covers of this prompt (None when not a receiver)."""
        return self.receiver.lookup(prompt_ids) if self.receiver is not None else None

    def on_submit(self, seq: Sequence, kv: dict[str, Any]) -> None:
        if self.sender is not None:
            self.sender.on_submit(seq, kv)

    def on_finished(self, seq: Sequence) -> None:
        """Before the response is built: sets `seq.kv_transfer_params` for `ret_first_tok`."""
        if self.sender is not None:
            self.sender.on_finished(seq)

    def render(self) -> str:
        return self.stats.render()

    def add_routes(self, app: web.Application) -> None:
        async def get(_: web.Request) -> web.Response:
            switches = self.sender.switches if self.sender else self.config.switches
            return web.json_response(switches.model_dump())

        async def post(request: web.Request) -> web.Response:
            try:
                switches = Switches.model_validate(orjson.loads(await request.read() or b"{}"))
            except (orjson.JSONDecodeError, pydantic.ValidationError) as e:
                return web.json_response({"error": f"Invalid switches: {e}"}, status=400)
            if self.sender is not None:
                self.sender.set_switches(switches)
            return web.json_response(switches.model_dump())

        app.router.add_get("/_sim/lmcache", get)
        app.router.add_post("/_sim/lmcache", post)
