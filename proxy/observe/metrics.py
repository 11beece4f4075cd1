"""Prometheus metrics of one proxy instance, in its own registry (no process-wide state)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.control.workers import Breaker, Health, WorkerPool


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
        available = GaugeMetricFamily(
            "pdproxy_worker_available",
            "1 if the worker gets traffic (health check and circuit breaker allow it)",
            labels=["role", "url"],
        )
        breaker_open = GaugeMetricFamily(
            "pdproxy_worker_breaker_open",
            "1 if the circuit breaker is open",
            labels=["role", "url"],
        )
        source = GaugeMetricFamily(
            "pdproxy_prefix_index_source",
            "1 for the prefix index that answers for the worker: events (its KV-cache events) "
            "or estimate",
            labels=["role", "url", "source"],
        )
        kv = {
            "bandwidth_bytes_per_second": "recent KV transfer bandwidth, bytes per second of "
            "transfer, from the engine's NIXL metrics",
            "seconds": "mean seconds per recent KV transfer",
            "bytes": "mean bytes per recent KV transfer",
            "slow": "1 if recent KV transfers ran under kv_health.min_bandwidth",
        }
        kv_gauges = {
            key: GaugeMetricFamily(f"pdproxy_kv_transfer_{key}", doc, labels=["role", "url"])
            for key, doc in kv.items()
        }
        for pool in self._pools:
            for w in pool.members:
                labels = [w.role, w.url]
                inflight.add_metric(labels, w.inflight)
                healthy.add_metric(labels, 1.0 if w.health is Health.HEALTHY else 0.0)
                available.add_metric(labels, 1.0 if w.available else 0.0)
                breaker_open.add_metric(labels, 1.0 if w.breaker is Breaker.OPEN else 0.0)
                source.add_metric([*labels, w.prefix_source], 1.0)
                t = w.kv_transfer
                if t is not None:
                    kv_gauges["bandwidth_bytes_per_second"].add_metric(labels, t.bandwidth)
                    kv_gauges["seconds"].add_metric(labels, t.seconds_per_transfer)
                    kv_gauges["bytes"].add_metric(labels, t.bytes_per_transfer)
                    kv_gauges["slow"].add_metric(labels, 1.0 if t.slow else 0.0)
        yield inflight
        yield healthy
        yield available
        yield breaker_open
        yield source
        yield from kv_gauges.values()


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
        self.retries = Counter(
            "pdproxy_retries",
            "legs sent again to another worker after a failure, by role",
            ["role"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "pdproxy_migrations",
            "streams continued on another decoder after theirs failed mid-answer, by what "
            "failed: connection, timeout (decode_idle), error_event",
            ["reason"],
            registry=self.registry,
        )
        self.migrations_failed = Counter(
            "pdproxy_migrations_failed",
            "streams broken mid-answer that were not continued, by why: limit "
            "(failover.migrations), no_decoder, continuation_failed, or the request's kind "
            "(structured_output, logprobs, beam_search, prompt_logprobs, ...)",
            ["why"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "pdproxy_prefill_fallbacks",
            "requests whose prompt the decoder computed because no prefiller could",
            ["reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "pdproxy_admission_rejected",
            "requests refused with 429 because the proxy was at its limit",
            registry=self.registry,
        )
        self.disagg_decisions = Counter(
            "pdproxy_disagg_decisions",
            "every request's plan: prefill on a prefiller (remote) or on the decoder (local), "
            "with the reason: dedicated (conditional disaggregation off); conditional "
            "disaggregation's short prompt, mostly cached on the decoder, long, or the decoder's "
            "KV pulls are slow (slow_kv); prompt_logprobs or beam_search (always served by a "
            "decoder alone); the pool's reasons (README, adaptive disaggregation)",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.registry.register(_WorkerCollector(pools))

    def render(self) -> bytes:
        return generate_latest(self.registry)
