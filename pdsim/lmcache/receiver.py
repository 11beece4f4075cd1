"""The decoder side of LMCache PD (``pd_role: receiver``): per TP rank, the init and alloc ports
a sender pushes to, the receive buffer the pushed chunks live in, and the retrieve that serves a
request from them and frees their pages.

A push (``POST /lmcache/put {"req_id", "keys"}`` on rank r's alloc port) is admitted, then takes
one page per chunk (``pdsim.lmcache.buffer``), waiting while the buffer is full; the answer comes
when every chunk has a page, or 503 when ``allocation_timeout`` ran out (the pages it took go
back). A request looks up its prompt less its last ``skip_last_n_tokens`` tokens (vLLM's
LMCache connector does), chunk by chunk; the leading chunks every rank holds are retrieved,
and retrieving removes them (``remove_after_retrieve``), giving their pages back. A chunk no
request retrieves keeps its page: with ``skip_last_n_tokens: 1`` the lookup's last chunk is one
token short of the pushed last chunk, so its key differs and one page per request leaks.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from pdsim.lmcache.buffer import PageBuffer
from pdsim.lmcache.chunks import chunk_keys
from pdsim.lmcache.config import LMCacheSimConfig
from pdsim.lmcache.stats import LMCacheStats
from pdsim.metrics import Metrics
from pdsim.nixl import KvLoad
from pdsim.web import MAX_BODY


class RankStore:
    """One TP rank's receive buffer and the chunks in it, each with the number of pushes that
    hold it: a chunk pushed again while held is pinned once more rather than copied (LMCache
    answers it as already sent), and its page goes back when the last holder retrieved it."""

    def __init__(self, pages: int, timeout: float) -> None:
        self.buffer = PageBuffer(pages, timeout)
        self.chunks: dict[int, int] = {}

    async def put(self, keys: list[int]) -> bool:
        """Pin the chunks held, give each new one a page; False (nothing kept) on timeout."""
        new = len([k for k in dict.fromkeys(keys) if k not in self.chunks])
        if not await self.buffer.reserve(new):
            return False
        try:
            if not await self.buffer.take_all(new):
                return False
        finally:
            self.buffer.unreserve(new)
        fresh = [k for k in dict.fromkeys(keys) if k not in self.chunks]
        self.buffer.give(new - len(fresh))  # another push may have put some while this waited
        for key in keys:
            self.chunks[key] = self.chunks.get(key, 0) + 1
        return True

    def remove(self, keys: list[int]) -> None:
        """Unpin retrieved chunks; a chunk no push holds any more gives its page back."""
        freed = 0
        for key in keys:
            holders = self.chunks.get(key, 0) - 1
            if holders > 0:
                self.chunks[key] = holders
            elif key in self.chunks:
                del self.chunks[key]
                freed += 1
        self.buffer.give(freed)


class Receiver:
    """The decoder side: one ``RankStore`` per TP rank."""

    def __init__(self, config: LMCacheSimConfig, stats: LMCacheStats, metrics: Metrics) -> None:
        self._config = config
        self._stats = stats
        self._metrics = metrics
        self.ranks = [
            RankStore(config.buffer_chunks, config.allocation_timeout) for _ in range(config.tp)
        ]

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
            if not await self.ranks[rank].put(keys):
                msg = f"no room for {len(keys)} chunks within the allocation timeout"
                return web.json_response({"error": msg}, status=503)
            self._stats.received_chunks += len(keys)
            return web.json_response({"stored": len(keys)})

        return put

    def lookup(self, prompt_ids: list[int]) -> KvLoad:
        """Retrieve the leading chunks every rank holds and free their pages; the last prompt
        token is recomputed."""
        skip = self._config.skip_last_n_tokens
        looked_up = prompt_ids[: len(prompt_ids) - skip]
        covered = 0
        retrieved: list[int] = []
        for key, tokens in chunk_keys(looked_up, self._config.chunk_size):
            if not all(key in rank.chunks for rank in self.ranks):
                break
            retrieved.append(key)
            covered += tokens
        loaded = min(covered, len(prompt_ids) - 1)
        if loaded <= 0:
            self._stats.missed_requests += 1
            self._metrics.recomputed_requests += 1
            return KvLoad("recomputed", failure="lmcache_miss")
        for rank in self.ranks:
            rank.remove(retrieved)
        self._stats.hit_requests += 1
        self._stats.loaded_tokens += loaded
        self._stats.retrieved_chunks += len(retrieved)
        return KvLoad("pulled", loaded_tokens=loaded)
