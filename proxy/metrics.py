"""Prometheus metrics of one proxy instance, in its own registry (no process-wide state)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.workers import Health, WorkerPool


class _WorkerCollector(Collector):
    """Reads worker load and health at scrape time, so the hot path updates nothing extra."""

    def __init__(self, pools: Sequence[WorkerPool]) -> None:
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        inflight = GaugeMetricFamily(
            "pdproxy_worker_inflight_requests", "requests in flight", labels=["role", "url"]
        )
        healthy = GaugeMetricFamily(
            "pdproxy_worker_healthy", "1 if the last check passed", labels=["role", "url"]
        )
        for pool in self._pools:
            for w in pool.workers:
                inflight.add_metric([w.role, w.url], w.inflight)
                healthy.add_metric([w.role, w.url], 1.0 if w.health is Health.HEALTHY else 0.0)
        yield inflight
        yield healthy


class ProxyMetrics:
    def __init__(self, pools: Sequence[WorkerPool]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pdproxy_requests",
            "finished client requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.recompute = Counter(
            "pdproxy_kv_recompute",
            "requests the decoder had to prefill itself because no KV was handed over",
            ["reason"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "pdproxy_client_disconnects",
            "clients that left before their answer was complete, by phase",
            ["phase"],
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "pdproxy_upstream_failures",
            "failed engine calls by role and error type",
            ["role", "type"],
            registry=self.registry,
        )
        self.registry.register(_WorkerCollector(pools))

    def render(self) -> bytes:
        return generate_latest(self.registry)
