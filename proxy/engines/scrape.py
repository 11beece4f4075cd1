"""Background scraping of the engines' own /metrics: one GET per engine per tick, parsed once,
read by each watch that is due.

A `Watch` is one reader of the engines' metrics: the metrics it reads, the roles of the workers it
watches, how often and how long it waits for an answer. Today two: the engines' load for the
policies and estimates (`load_watch`, every `routing.scrape_interval`), and KV-transfer health
(proxy.control.kvhealth, every `kv_health.interval`, decoders and pool engines only).

The scraper ticks at the interval of its most frequent watch. At each tick the watches whose own
interval has passed since their last turn are due; each engine that a due watch looks at is
scraped once, with the longest timeout of those watches, and its samples go to each of them. A
watch whose own timeout the answer overran is told the engine could not be read, as it would have
been had it scraped alone. I/O goes through EngineClient.get.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from time import monotonic

from proxy.control.workers import EngineLoad, Role, Worker
from proxy.engines.client import EngineClient
from proxy.engines.promtext import Samples, parse
from proxy.errors import ProxyError

log = logging.getLogger("pdproxy")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_INFO = "vllm:cache_config_info"
LOAD_METRICS = (RUNNING, WAITING, KV_USAGE, CACHE_INFO)
ALL_ROLES: frozenset[Role] = frozenset(("prefill", "decode", "pool"))


async def read_metrics(
    engine: EngineClient, worker: Worker, names: Iterable[str], timeout: float
) -> Samples | None:
    """The samples of `names` in the worker's /metrics; None when it cannot be read."""
    try:
        status, raw = await engine.get(worker, "/metrics", timeout)
    except ProxyError as exc:
        log.debug("%s worker %s: /metrics unreadable: %s", worker.role, worker.url, exc)
        return None
    return parse(raw, names) if status == 200 else None


def engine_load(samples: Samples, inflight: int) -> EngineLoad | None:
    """The three gauges, summed over label sets (e.g. data-parallel ranks; the KV usage is the
    highest), and whether the engine caches prefixes; None when `running` is absent."""
    running = samples.sum(RUNNING)
    if running is None:
        return None
    caching = samples.label(CACHE_INFO, "enable_prefix_caching")
    return EngineLoad(
        running,
        samples.sum(WAITING) or 0.0,
        samples.max(KV_USAGE) or 0.0,
        inflight,
        None if caching not in ("True", "False") else caching == "True",
    )


def observe_load(worker: Worker, samples: Samples | None) -> None:
    """The engine's load for the load-aware policies; cleared when unreadable, so that no policy
    acts on a stale view (it falls back to the proxy's own in-flight counts). What the engine
    says of its prefix cache outlives a failed scrape."""
    if samples is None and worker.engine_load is not None:
        log.info("%s worker %s: no load metrics", worker.role, worker.url)
    worker.engine_load = None if samples is None else engine_load(samples, worker.inflight)
    if worker.engine_load is not None and worker.engine_load.prefix_caching is not None:
        worker.prefix_caching = worker.engine_load.prefix_caching


@dataclass(slots=True)
class Watch:
    """One reader of the engines' /metrics."""

    names: tuple[str, ...]
    observe: Callable[[Worker, Samples | None], None]
    interval: float
    timeout: float
    roles: frozenset[Role] = ALL_ROLES
    last: float = field(default=-float("inf"), compare=False)  # when it was last due


def load_watch(interval: float, timeout: float) -> Watch:
    """The engines' load and prefix-caching flag, for every engine."""
    return Watch(LOAD_METRICS, observe_load, interval, timeout)


class Scraper:
    """Every tick, GET each watched engine's /metrics once and hand the samples to the watches
    that are due (`workers()`: every engine still serving, draining ones included)."""

    def __init__(
        self,
        engine: EngineClient,
        workers: Callable[[], Iterable[Worker]],
        watches: Sequence[Watch],
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._engine = engine
        self._workers = workers
        self.watches = tuple(watches)
        self.interval = min(w.interval for w in self.watches)
        self._clock = clock

    async def scrape(self, worker: Worker, watches: Sequence[Watch] | None = None) -> None:
        """One GET of the worker's /metrics for `watches` (default: all) that look at it."""
        mine = [w for w in (watches or self.watches) if worker.role in w.roles]
        if not mine:
            return
        names = tuple(dict.fromkeys(n for w in mine for n in w.names))
        started = self._clock()
        samples = await read_metrics(self._engine, worker, names, max(w.timeout for w in mine))
        took = self._clock() - started
        for watch in mine:
            watch.observe(worker, samples if took <= watch.timeout else None)

    async def tick(self) -> None:
        """Scrape for the watches that are due now."""
        now = self._clock()
        due = [w for w in self.watches if now - w.last >= w.interval - 1e-3]
        for watch in due:
            watch.last = now
        if due:
            await asyncio.gather(*(self.scrape(w, due) for w in self._workers()))

    async def run(self) -> None:
        """Scrape forever (cancel the task to stop)."""
        while True:
            await self.tick()
            await asyncio.sleep(self.interval)
