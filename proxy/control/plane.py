"""The control plane of one proxy: who the workers are and how they are.

It owns the workers' registry (from the state file when there is one, else the config), the
scraper of the engines' /metrics (their load, prefix caching and KV-transfer health), the
active health checks, the stall watch, the pool's controller loop, the admission prober and the
admin service. The app builds it after the
data plane's connector, which the probes use, and runs it in its lifespan: `start` probes the
configured workers (health.probe_on_start) and starts the loops; `close` stops them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from proxy.auth import Authenticator
from proxy.config import ConfigError, ProxyConfig
from proxy.control.admin.hosts import HostAllowList
from proxy.control.admin.probes import Prober
from proxy.control.admin.service import Admin
from proxy.control.admin.state import StateError, StateFile
from proxy.control.health import HealthChecker
from proxy.control.kvevents import Endpoints, KvEvents
from proxy.control.kvhealth import KvHealth
from proxy.control.membership.source import membership_source
from proxy.control.pool import PoolController
from proxy.control.registry import ROLES, EndRequests, WorkerRegistry
from proxy.control.stall import StallWatch
from proxy.control.workers import Worker, WorkerPool
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector
from proxy.engines.connectors.registry import connector_class
from proxy.engines.scrape import Scraper, Watch, load_watch
from proxy.errors import ProxyError
from proxy.place.kvindex import KvIndex

log = logging.getLogger("pdproxy")

# the policies that read the engines' own load (prefix_aware bounds its choice by it)
LOAD_POLICIES = frozenset(("load_aware", "prefix_aware"))


def state_file(config: ProxyConfig) -> StateFile | None:
    return StateFile(config.workers_state_file) if config.workers_state_file else None


def initial_workers(config: ProxyConfig) -> WorkerRegistry:
    """The workers recorded in the state file when there is one (the set after the last change
    at run time), else the configured ones, ids in config order (p0, p1, ..., d0, ...)."""
    state = state_file(config)
    try:
        records = state.read() if state is not None else None
    except StateError as exc:
        raise ConfigError(str(exc)) from None
    registry = WorkerRegistry.empty(config.health.failure_threshold, config.health.cooldown)
    kind = connector_class(config.connector)
    if records is not None:
        for record in records:
            receiver = record.receiver()
            if kind.decoder_receivers and record.role == "decode" and receiver is None:
                raise ConfigError(
                    f"workers state file {state.path if state else ''}: decoder {record.id} has "
                    f"no {kind.name} receiver, which connector {kind.name} needs"
                )
            registry.add(record.role, record.url, receiver, record.id)
        log.info(
            "workers from %s (the configured lists are not used while it exists): %s",
            state.path if state is not None else "",
            ", ".join(f"{r.id}={r.url}" for r in records) or "none",
        )
        return registry
    receivers = kind.receivers([(w.url, w.lmcache) for w in config.decode])
    for spec in config.prefill:
        registry.add("prefill", spec.url)
    for spec, receiver in zip(config.decode, receivers, strict=True):
        registry.add("decode", spec.url, receiver)
    for spec in config.pool:
        registry.add("pool", spec.url)
    return registry


def watches(
    config: ProxyConfig, kv_health: KvHealth | None, stalls: StallWatch | None
) -> list[Watch]:
    """What the scraper reads: the engines' load where a policy, conditional disaggregation or
    the pool's planner uses it (with whether an engine caches prefixes), KV health, and the
    engines' work counters for the stall watch (a few reads per stall timeout)."""
    routing = config.routing
    wanted = (
        bool({config.prefill_policy, config.decode_policy} & LOAD_POLICIES)
        or config.has_pool
        or config.conditional_disagg.enabled
    )
    found = []
    if routing.scrape_interval > 0 and wanted:
        found.append(load_watch(routing.scrape_interval, routing.scrape_timeout))
    if kv_health is not None:
        found.append(kv_health.watch(config.kv_health.interval, config.health.timeout))
    if stalls is not None:
        every = min(15.0, max(1.0, stalls.timeout / 4))
        found.append(stalls.watch(every, config.health.timeout))
    return found


def make_kv_health(config: ProxyConfig) -> KvHealth | None:
    """KV health where it is on and the connector's decoders count their transfers."""
    source = connector_class(config.connector).transfer_metrics
    kvh = config.kv_health
    if not kvh.enabled or source is None:
        return None
    return KvHealth(
        source,
        kvh.min_bandwidth,
        kvh.window,
        kvh.min_bytes,
        kvh.warn_interval,
        min_pulls=kvh.min_pulls,
        warmup_pulls=kvh.warmup_pulls,
        engine_get_zcopy=kvh.engine_get_zcopy,
    )


def make_admin(
    config: ProxyConfig,
    registry: WorkerRegistry,
    prober: Prober,
    auth: Authenticator,
    end_requests: EndRequests,
    scraper: Scraper | None,
    metrics: CollectorRegistry,
) -> Admin:
    admin = config.admin
    allowed = (
        HostAllowList(admin.allowed_worker_hosts)
        if admin.allowed_worker_hosts is not None
        else HostAllowList.default(w.url for w in (*config.prefill, *config.decode, *config.pool))
    )
    return Admin(
        admin,
        registry,
        prober,
        auth,
        config.host,
        connector_class(config.connector),
        config.drain_timeout,
        end_requests,
        state_file(config),
        scraper,
        allowed,
        metrics,
    )


class ControlPlane:
    def __init__(
        self,
        config: ProxyConfig,
        engine: EngineClient,
        registry: WorkerRegistry,
        connector: Connector,
        auth: Authenticator,
        metrics: CollectorRegistry,
        end_requests: EndRequests,
        pool: PoolController | None = None,
        kv_index: KvIndex | None = None,
    ) -> None:
        self.config = config
        self.pool = pool  # adaptive: its controller decides every pool_planner.interval
        stall = config.health.stall_timeout
        self.stalls = StallWatch(lambda: self.pools, stall) if stall > 0 else None
        self.engine = engine
        self.registry = registry
        self.kv_health = make_kv_health(config)
        found = watches(config, self.kv_health, self.stalls)
        self.scraper = Scraper(engine, self.members, found) if found else None
        self.health = HealthChecker(engine, self.pools, config.health.timeout)
        admin = config.admin
        prober = Prober(
            engine,
            connector,
            registry,
            admin.probe_timeout,
            admin.probe_words or connector_class(config.connector).probe_words,
            admin.probe_pull_wait,
            pool_kv=config.pool_mode == "adaptive",
            candidate_partners=config.discovery.source != "static",
        )
        self.admin = make_admin(config, registry, prober, auth, end_requests, self.scraper, metrics)
        if self.admin.refusal is not None:
            log.warning("%s", self.admin.refusal)
        try:
            self.admin.save()  # the file names the workers the proxy starts with
        except ProxyError as exc:
            raise ConfigError(exc.message) from None
        registry.on_removed.append(self._forget)
        # workers found outside the config (discovery:), joined and drained through the admin
        self.membership = membership_source(config.discovery, self.admin, metrics, pool)
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_refused: set[str] = set()  # workers whose event sockets the rule cannot name
        # what the engines' own KV-cache events say they hold: the planner's (proxy.place.kvindex)
        self.kv_index = KvIndex() if kv_index is None else kv_index
        events = config.kv_events
        self.kv_events = (
            KvEvents(self.kv_index, events.topic, events.replay_timeout) if events.enabled else None
        )

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        """The prefill, decode and pool workers."""
        return tuple(self.registry.pools[role] for role in ROLES)

    def members(self) -> Iterator[Worker]:
        """Every worker still serving (draining ones included): what the scraper reads."""
        for pool in self.pools:
            yield from pool.members

    def _forget(self, worker: Worker) -> None:
        """What the control plane keeps per worker: connections, KV-transfer samples."""
        self.engine.forget(worker.url)
        if worker.role != "prefill" and self.kv_health is not None:
            self.kv_health.forget(worker.url)

    async def start(self) -> None:
        """Probe the configured workers if asked, then start the health checks and scrapes."""
        health = self.config.health
        await self.admin.start(health.probe_on_start, health.interval or 5.0)
        if self.membership is not None:
            await self.membership.start()
        if health.interval > 0:
            self._tasks.append(asyncio.create_task(self.health.run(health.interval)))
        if self.scraper is not None:
            self._tasks.append(asyncio.create_task(self.scraper.run()))
        if self.stalls is not None:
            every = min(1.0, self.stalls.timeout / 4)
            self._tasks.append(asyncio.create_task(self.stalls.run(every)))
        if self.pool is not None and self.config.pool_mode == "adaptive":
            self._tasks.append(asyncio.create_task(self.pool.run()))
        if self.kv_events is not None:
            self.follow_kv_events(self.kv_events)
            self._tasks.append(asyncio.create_task(self._kv_events_loop(self.kv_events)))

    def follow_kv_events(self, events: KvEvents) -> None:
        """A subscriber for every worker without one (those that joined since), none for those
        that left."""
        members = {w.url: w for w in self.members()}
        for url in [u for u in events.running if u not in members]:
            self._tasks.append(asyncio.create_task(events.stop(url)))
        for url, worker in members.items():
            if url in events.running or url in self._kv_refused:
                continue
            try:
                found = self.config.kv_events.endpoint_for(url)
            except ValueError as exc:
                log.warning("KV events: %s; %s keeps the estimate", exc, url)
                self._kv_refused.add(url)
                continue
            events.start(worker, Endpoints(found.publisher, found.replay, found.bind))

    async def _kv_events_loop(self, events: KvEvents, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.follow_kv_events(events)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.membership is not None:
            await self.membership.close()
        if self.kv_events is not None:
            await self.kv_events.close()
        await self.admin.close()
