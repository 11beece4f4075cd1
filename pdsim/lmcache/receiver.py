"""The decoder side of LMCache PD (``pd_role: receiver``): per TP rank, the init and alloc ports
a sender pushes to, and the pushed chunks a request is served from."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web

from pdsim.lmcache.chunks import chunk_keys
from pdsim.lmcache.config import LMCacheSimConfig
from pdsim.lmcache.stats import LMCacheStats
from pdsim.metrics import Metrics
from pdsim.nixl import KvLoad
from pdsim.web import MAX_BODY

STORE_LIMIT = 200_000  # chunk keys kept per receiver rank


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
            alloc = web.Application(client_max_size=MAX_BODY)
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
