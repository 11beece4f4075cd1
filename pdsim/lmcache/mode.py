"""What a sim instance runs in LMCache mode: its sender or receiver, their lifecycle, the hooks
the server and the engine call, the ``pdsim:lmcache_*`` metrics, the ``/_sim/lmcache`` switches
and ``GET /_sim/lmcache/buffers`` (each rank's buffer: total, used, reserved, waiting,
timeouts)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import aiohttp
import orjson
import pydantic
from aiohttp import web

from pdsim.config import Timing
from pdsim.engine import Sequence
from pdsim.lmcache.buffer import PageBuffer
from pdsim.lmcache.config import LMCacheSimConfig, Switches
from pdsim.lmcache.receiver import Receiver
from pdsim.lmcache.sender import Sender
from pdsim.lmcache.stats import LMCacheStats, render_buffers
from pdsim.metrics import Metrics
from pdsim.nixl import KvLoad


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
        for buffer in self._buffers():
            buffer.close()
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

    def on_prefilled(self, seq: Sequence) -> Coroutine[Any, Any, None] | None:
        """Sender: the save the engine step waits for once it computed this prompt."""
        return self.sender.on_prefilled(seq) if self.sender is not None else None

    def on_finished(self, seq: Sequence) -> None:
        """Before the response is built: sets `seq.kv_transfer_params` for `ret_first_tok`."""
        if self.sender is not None:
            self.sender.on_finished(seq)

    def _buffers(self) -> list[PageBuffer]:
        if self.receiver is not None:
            return [rank.buffer for rank in self.receiver.ranks]
        return list(self.sender.staging) if self.sender is not None else []

    def render(self) -> str:
        text = self.stats.render()
        if self.receiver is not None:
            text += render_buffers("pdsim:lmcache_buffer", "receive buffer", self._buffers())
        if self.sender is not None:
            text += render_buffers("pdsim:lmcache_staging", "staging buffer", self._buffers())
        return text

    def buffers(self) -> dict[str, list[dict[str, int]]]:
        """Occupancy per TP rank: the receive buffer (receiver) or staging buffer (sender)."""
        kind = "receive" if self.receiver is not None else "staging"
        buffers = self._buffers()
        return {kind: [buffer.state() for buffer in buffers]} if buffers else {}

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

        async def buffers(_: web.Request) -> web.Response:
            return web.json_response(self.buffers())

        app.router.add_get("/_sim/lmcache", get)
        app.router.add_post("/_sim/lmcache", post)
        app.router.add_get("/_sim/lmcache/buffers", buffers)
