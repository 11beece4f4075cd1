"""The console's live feed: one JSON snapshot per tick, for each page that watches.

A snapshot holds what the page draws: the workers (as the admin API lists them) with each
engine's own view from its /metrics (running, waiting, KV usage, prefix-cache hit rate, NIXL
pulls), the latency windows (p50/p95/p99), the requests finished since the page's last tick
(rates, per-tick percentiles, their timelines), the proxy's PD counters and admin events.

Nothing here runs unless a page is connected; the engines are scraped at most once per tick
whatever the number of pages, and never by the request path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.control.admin.service import Admin
from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.engines.scrape import read_metrics
from proxy.observe.stats import LatencyStats
from proxy.observe.timeline import TimelineRing

ENGINE_METRICS = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_usage": "vllm:kv_cache_usage_perc",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "nixl_pulls": "vllm:nixl_xfer_time_seconds_count",
    "nixl_failed": "vllm:nixl_num_failed_transfers_total",
    "generation_tokens": "vllm:generation_tokens_total",
}
COUNTERS = (
    "pdproxy_requests_total",
    "pdproxy_kv_recompute_total",
    "pdproxy_prefill_fallbacks_total",
    "pdproxy_retries_total",
    "pdproxy_migrations_total",
    "pdproxy_client_disconnects_total",
    "pdproxy_upstream_failures_total",
    "pdproxy_admission_rejected_total",
    "pdproxy_worker_probes_total",
    "pdproxy_lmcache_notify_timeouts_total",
)
TABLE_ROWS = 50  # timelines sent per tick at most (the page keeps its own bounded table)


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p99": at(0.99)}


def ended_at(timeline: dict[str, Any]) -> float:
    """When a described request ended, wall clock seconds."""
    return float(timeline["started_at"]) + (timeline["ms"]["total"] or 0.0) / 1e3


@dataclass(eq=False)
class ConsoleFeed:
    admin: Admin
    engine: EngineClient
    stats: LatencyStats
    timelines: TimelineRing
    metrics: CollectorRegistry
    info: Callable[[], dict[str, Any]]  # connector, policies, admission, draining
    interval: float = 1.0
    scrape_timeout: float = 1.0
    watchers: int = field(default=0, init=False)
    _engines: dict[str, dict[str, float]] = field(default_factory=dict, init=False)
    _scraped_at: float = field(default=0.0, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def _scrape(self, worker: Worker) -> tuple[str, dict[str, float] | None]:
        names = ENGINE_METRICS.values()
        samples = await read_metrics(self.engine, worker, names, self.scrape_timeout)
        if samples is None:
            return worker.id, None
        sums = samples.sums(names)
        return worker.id, {key: sums[name] for key, name in ENGINE_METRICS.items() if name in sums}

    async def engines(self) -> dict[str, dict[str, float]]:
        """Each member's own metrics, scraped at most once per half tick."""
        async with self._lock:
            if time.monotonic() - self._scraped_at >= self.interval / 2:
                members = [w for pool in self.admin.registry.pools.values() for w in pool.members]
                results = await asyncio.gather(*(self._scrape(w) for w in members))
                self._engines = {wid: view for wid, view in results if view is not None}
                self._scraped_at = time.monotonic()
            return self._engines

    def counters(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for family in self.metrics.collect():
            for sample in family.samples:
                if sample.name in COUNTERS:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out.setdefault(sample.name, {})[labels] = sample.value
        return out

    def latency(self) -> dict[str, dict[str, float] | None]:
        return {
            name: None
            if s is None
            else {"count": s.count, "p50": s.p50, "p95": s.p95, "p99": s.p99}
            for name, s in self.stats.summaries().items()
        }

    async def snapshot(self, since: int, dt: float | None) -> tuple[int, dict[str, Any]]:
        """The snapshot for a page that has seen timelines up to `since`, `dt` s ago. A page's
        first tick (`dt` None) gets the history for its table, but its tick counts only the
        requests that ended in the last `interval` seconds: the history is no one second's
        traffic (it drew a false spike that also fixed the charts' scale)."""
        history = self.timelines.since(since, limit=len(self.timelines) or 1)
        seq = self.timelines.seq
        new = history
        if dt is None:
            dt = self.interval
            new = [t for t in history if ended_at(t) >= time.time() - dt]
        errors = [t for t in new if (t["status"] >= 400 and t["status"] != 499) or t["error"]]

        def hop(name: str) -> dict[str, float] | None:
            return percentiles([t["ms"][name] for t in new if t["ms"][name] is not None])

        kv: dict[str, int] = {}
        for t in new:
            if t["kv"] is not None:
                kv[t["kv"]] = kv.get(t["kv"], 0) + 1
        engines = await self.engines()
        return seq, {
            "at": round(time.time(), 3),
            "seq": seq,
            "workers": self.admin.list(),
            "engines": engines,
            "latency": self.latency(),
            "tick": {
                "seconds": round(dt, 3),
                "requests": len(new),
                "errors": len(errors),
                "client_left": sum(1 for t in new if t["status"] == 499),
                "kv": kv,
                "ttft": hop("ttft"),
                "itl": hop("itl"),
                "tpot": hop("tpot"),
                "e2e": hop("total"),
            },
            "timelines": history[-TABLE_ROWS:],
            # KV handed over per decoder, by requests only (the engines' own pull counts
            # include the admission probes' pulls)
            "handed_over": dict(self.timelines.handed_over),
            "counters": self.counters(),
            "events": list(self.admin.events),
            **self.info(),
        }
