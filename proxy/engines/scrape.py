"""Background scraping of the engines' own load from their Prometheus /metrics.

Every `interval` seconds each worker's `vllm:num_requests_running`, `vllm:num_requests_waiting`
and `vllm:kv_cache_usage_perc` are read (summed over label sets, e.g. data-parallel ranks; the
KV usage is the highest), with `vllm:cache_config_info`'s `enable_prefix_caching`, and stored on
the worker as an `EngineLoad`, for policies such as
`load_aware` to read. A failed scrape clears it, so a policy never acts on a stale view: it
falls back to the proxy's own in-flight counts. I/O goes through EngineClient.get.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable

from proxy.control.workers import EngineLoad, Worker
from proxy.engines.client import EngineClient
from proxy.errors import ProxyError

log = logging.getLogger("pdproxy")

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
KV_USAGE = b"vllm:kv_cache_usage_perc"
CACHE_INFO = b"vllm:cache_config_info{"
PREFIX_CACHING = re.compile(rb'[{,]enable_prefix_caching="(True|False)"')


def parse_load(text: bytes, inflight: int) -> EngineLoad | None:
    """The three gauges from a Prometheus text exposition, and whether the engine caches
    prefixes (`vllm:cache_config_info`); None when `running` is absent."""
    found: dict[bytes, float] = {}
    prefix_caching: bool | None = None
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        if line.startswith(CACHE_INFO):
            m = PREFIX_CACHING.search(line)
            if m is not None:
                prefix_caching = m.group(1) == b"True"
            continue
        name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=-1)
        name = line[:name_end]
        if name not in (RUNNING, WAITING, KV_USAGE):
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if name == KV_USAGE:
            found[name] = max(found.get(name, 0.0), value)
        else:
            found[name] = found.get(name, 0.0) + value
    if RUNNING not in found:
        return None
    return EngineLoad(
        found[RUNNING], found.get(WAITING, 0.0), found.get(KV_USAGE, 0.0), inflight, prefix_caching
    )


class Scraper:
    """Every `interval` seconds, GET each of `workers()`'s /metrics and hand the text to
    `observe` (None when the engine could not be read), one worker at a time per call."""

    def __init__(
        self,
        engine: EngineClient,
        workers: Callable[[], Iterable[Worker]],
        observe: Callable[[Worker, bytes | None], None],
        interval: float,
        timeout: float,
    ) -> None:
        self._engine = engine
        self._workers = workers
        self._observe = observe
        self.interval = interval
        self.timeout = timeout

    async def scrape(self, worker: Worker) -> None:
        try:
            status, raw = await self._engine.get(worker, "/metrics", self.timeout)
        except ProxyError as exc:
            log.debug("%s worker %s: /metrics unreadable: %s", worker.role, worker.url, exc)
            self._observe(worker, None)
            return
        self._observe(worker, raw if status == 200 else None)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(w) for w in self._workers()))

    async def run(self) -> None:
        """Scrape forever (cancel the task to stop)."""
        while True:
            await self.scrape_all()
            await asyncio.sleep(self.interval)


def observe_load(worker: Worker, raw: bytes | None) -> None:
    """The engine's load for the load-aware policies; cleared when unreadable, so that no policy
    acts on a stale view."""
    if raw is None and worker.engine_load is not None:
        log.info("%s worker %s: no load metrics", worker.role, worker.url)
    worker.engine_load = None if raw is None else parse_load(raw, worker.inflight)
    if worker.engine_load is not None and worker.engine_load.prefix_caching is not None:
        worker.prefix_caching = worker.engine_load.prefix_caching
