"""The app factory: everything a proxy instance owns is built here and torn down in its lifespan.

    control plane   proxy.control.plane: the workers, their health, scrapes, KV health, the
                    admission probes and the admin service; the pool's controller; the stall watch
    data plane      proxy.serve.plane: the router, the planner, the legs' services and the
                    endpoints of the generation paths (and vLLM's other paths)
    HTTP surface    proxy.serve.api: /health, /stats, /v1/models, /metrics, /admin, /console
    companions      what else lives as long as the app (`Companion`): with `workers` > 1, the
                    serving processes' supervisor (proxy.procs.supervisor); none by default

The two generation paths are served by their endpoints directly (a front dispatcher sends them
there before any framework code runs); FastAPI serves everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from proxy.auth import Authenticator, load_keys
from proxy.config import ConfigError, ProxyConfig
from proxy.control.plane import ControlPlane, initial_workers
from proxy.control.pool import PoolController
from proxy.control.registry import ROLES
from proxy.control.workers import WorkerPool
from proxy.engines.client import EngineClient
from proxy.engines.connectors.factory import make_connector
from proxy.observe.metrics import ProxyMetrics
from proxy.serve.api import Companion, build_api
from proxy.serve.plane import build_data_plane
from proxy.serve.responder import Receive, Scope, Send

log = logging.getLogger("pdproxy")


def authenticator(config: ProxyConfig) -> Authenticator:
    auth = config.auth
    try:
        return Authenticator(
            load_keys(auth.api_keys_env, auth.api_keys_file),
            load_keys(auth.admin_keys_env, auth.admin_keys_file),
        )
    except ValueError as exc:
        raise ConfigError(f"auth: {exc}") from None


class ProxyApp:
    """One proxy instance: its config, both planes, and the ASGI callable serving them."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.engine = EngineClient(config.timeouts.connect, config.engine_api_key)
        self.registry = initial_workers(config)
        prefill, decode, pooled = (self.registry.pools[role] for role in ROLES)
        self.pools: tuple[WorkerPool, WorkerPool, WorkerPool] = (prefill, decode, pooled)
        self.metrics = ProxyMetrics(self.pools)
        auth = authenticator(config)
        self.pool = (
            PoolController(self.pools, config.pool_planner, config.pool_mode, self.metrics.registry)
            if config.has_pool
            else None
        )
        self.connector = make_connector(config, self.engine, self.metrics.registry)
        self.plane = build_data_plane(
            config, self.pools, self.engine, self.connector, self.metrics, auth, self.pool
        )
        self.services = self.plane.services
        self.registry.on_removed.append(self.plane.planner.forget)
        self.control = ControlPlane(
            config,
            self.engine,
            self.registry,
            self.connector,
            auth,
            self.metrics.registry,
            self.services.end_requests,
            self.pool,
            self.plane.planner.kv_index,
        )
        self.companions: list[Companion] = []
        self.api = build_api(self, self.lifespan)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.plane.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.api(scope, receive, send)

    def begin_drain(self) -> None:
        """Stop taking requests; in-flight ones get `drain_timeout` seconds to finish, then
        end with an error event. Safe to call from a signal handler."""
        if self.services.draining or self._loop is None:
            return
        self.services.draining = True
        log.info("draining: in-flight requests have %gs to finish", self.config.drain_timeout)
        self._loop.call_soon_threadsafe(
            self._loop.call_later, self.config.drain_timeout, self.services.end_inflight
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.connector.start()  # first: nothing to undo if its bind fails
        await self.engine.start()
        await self.control.start()
        for companion in self.companions:
            await companion.start()
        self._loop = asyncio.get_running_loop()
        # everything built so far lives as long as the process: keep it out of the cyclic
        # GC's scans, whose full passes over it stall the loop for milliseconds (p99 TTFT)
        gc.collect()
        gc.freeze()
        report = None
        if self.config.stats.interval > 0:
            report = asyncio.create_task(self._report_stats(self.config.stats.interval))
        try:
            yield
        finally:
            if report is not None:
                report.cancel()
            for companion in reversed(self.companions):
                await companion.close()
            await self.control.close()
            await self.connector.close()
            await self.engine.close()

    async def _report_stats(self, interval: float) -> None:
        stats = self.services.stats
        logged = 0
        while True:
            await asyncio.sleep(interval)
            if stats.recorded != logged:
                logged = stats.recorded
                log.info("%s", stats.report())


def build_app(config: ProxyConfig) -> ProxyApp:
    return ProxyApp(config)
