"""The app factory: everything a proxy instance owns is built here and torn down in its lifespan.

The two generation paths are served by `CompletionEndpoint` directly (a front dispatcher sends them
there before any framework code runs); FastAPI serves the control endpoints and the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from proxy import __version__
from proxy.config import ConfigError, ProxyConfig
from proxy.control.admin.hosts import HostAllowList
from proxy.control.admin.probes import Prober
from proxy.control.admin.routes import add_admin_routes
from proxy.control.admin.service import Admin
from proxy.control.admin.state import StateError, StateFile
from proxy.control.console import add_console_routes
from proxy.control.console.feed import ConsoleFeed
from proxy.control.kvhealth import KvHealth
from proxy.control.registry import WorkerRegistry
from proxy.control.workers import Health, Worker, WorkerPool
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import make_connector
from proxy.engines.connectors.lmcache_config import Receiver, resolve_receivers
from proxy.engines.scrape import Scraper, observe_load
from proxy.errors import (
    MethodNotAllowed,
    NotFound,
    NotImplementedByProxy,
    ProxyError,
    UpstreamError,
)
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import LatencyStats
from proxy.observe.timeline import TimelineRing
from proxy.place.disagg import DisaggPlanner
from proxy.place.plan import Router
from proxy.place.policies import PolicyOptions, make_policy
from proxy.place.policies.conditional import ConditionalDisagg
from proxy.place.pool_planner import PoolPlanner
from proxy.request import CHAT, COMPLETIONS
from proxy.serve.admission import Admission
from proxy.serve.auth import Authenticator, load_keys
from proxy.serve.endpoint import CompletionEndpoint, Receive, Scope, Send, Services
from proxy.serve.passthrough import RESPONSES_UNSUPPORTED, ROUTES, PassThrough

log = logging.getLogger("pdproxy")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(exc: ProxyError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json")


class ProxyApp:
    """One proxy instance: its config, workers, services, and the ASGI callable serving them."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.engine = EngineClient(config.timeouts.connect, config.engine_api_key)
        state = StateFile(config.workers_state_file) if config.workers_state_file else None
        try:
            self.registry = initial_workers(config, state)
        except StateError as exc:
            raise ConfigError(str(exc)) from None
        prefill, decode, pool = (self.registry.pools[r] for r in ("prefill", "decode", "pool"))
        self.metrics = ProxyMetrics((prefill, decode, pool))
        auth = config.auth
        try:
            authenticator = Authenticator(
                load_keys(auth.api_keys_env, auth.api_keys_file),
                load_keys(auth.admin_keys_env, auth.admin_keys_file),
            )
        except ValueError as exc:
            raise ConfigError(f"auth: {exc}") from None
        admission = config.admission
        routing, disagg = config.routing, config.conditional_disagg
        options = PolicyOptions(
            routing.prefix_block_chars,
            routing.balance_abs,
            routing.balance_rel,
            routing.waiting_weight,
            routing.kv_high,
        )
        policies = {config.prefill_policy, config.decode_policy}
        # engine load from /metrics: for the policies that read it (prefix_aware bounds by it),
        # and whether an engine caches prefixes, for the estimates of conditional disaggregation
        # and the pool's planner
        scraped = (
            bool(policies & {"load_aware", "prefix_aware"}) or bool(config.pool) or disagg.enabled
        )
        self.scraper = (
            Scraper(self.engine, lambda: (*prefill.members, *decode.members, *pool.members),
                    observe_load, routing.scrape_interval, routing.scrape_timeout)
            if routing.scrape_interval > 0 and scraped
            else None
        )  # fmt: skip
        kvh = config.kv_health
        self.kv_health = (
            KvHealth(
                kvh.min_bandwidth,
                kvh.window,
                kvh.min_bytes,
                kvh.warn_interval,
                min_pulls=kvh.min_pulls,
                warmup_pulls=kvh.warmup_pulls,
                engine_get_zcopy=kvh.engine_get_zcopy,
            )
            if kvh.enabled and config.connector == "nixl"
            else None
        )
        self.kv_monitor = (
            Scraper(
                self.engine,
                lambda: (*decode.members, *pool.members),  # draining ones still pull
                self.kv_health.observe_metrics,
                kvh.interval,
                config.health.timeout,
            )
            if self.kv_health is not None
            else None
        )
        router = Router(
            prefill,
            decode,
            make_policy(config.prefill_policy, options),
            make_policy(config.decode_policy, options),
            pool,
        )
        self.pool_planner = (
            PoolPlanner(
                router,
                self.engine,
                self.metrics,
                config.pool_planner,
                config.pool_mode,
                routing.waiting_weight,
                routing.kv_high,
                routing.prefix_block_chars,
            )
            if config.pool
            else None
        )
        self.services = Services(
            router=router,
            planner=self.pool_planner,
            connector=make_connector(config, self.engine, self.metrics.registry),
            engine=self.engine,
            metrics=self.metrics,
            stats=LatencyStats(config.stats.window, self.metrics.registry),
            timelines=TimelineRing(config.stats.timelines),
            admission=Admission(
                admission.max_concurrent, admission.max_queue, admission.queue_timeout
            ),
            auth=authenticator,
            failover=config.failover,
            fanout=config.fanout,
            max_body_bytes=config.max_body_bytes,
            decode_first_byte_timeout=config.timeouts.decode_first_byte,
            decode_idle_timeout=config.timeouts.decode_idle,
            prefix_chars=routing.prefix_chars
            if disagg.enabled or "prefix_aware" in policies or config.pool_mode == "adaptive"
            else 0,
            disagg=DisaggPlanner(
                ConditionalDisagg(disagg.min_prefill_tokens),
                self.engine,
                self.metrics,
                routing.prefix_block_chars,
                disagg.tokenize_timeout,
            )
            if disagg.enabled
            else None,
        )
        self.registry.on_removed += [self.services.plans.forget, self._forget]
        self.hot_paths: dict[str, Any] = {
            CHAT: CompletionEndpoint(self.services, CHAT),
            COMPLETIONS: CompletionEndpoint(self.services, COMPLETIONS),
        }
        for path, method in ROUTES.items():  # vLLM's other endpoints, to a decoder as they are
            self.hot_paths[path] = PassThrough(self.services, path, method)
        admin = config.admin
        words = admin.probe_words or (400 if config.connector == "lmcache" else 48)
        prober = Prober(
            self.engine,
            self.services.connector,
            self.registry,
            admin.probe_timeout,
            words,
            admin.probe_pull_wait,
            pool_kv=config.pool_mode == "adaptive",
        )
        allowed = None
        if admin.allowed_worker_hosts is not None:
            allowed = HostAllowList(admin.allowed_worker_hosts)
        self.admin = Admin(
            admin,
            self.registry,
            prober,
            authenticator,
            config.host,
            config.connector,
            config.drain_timeout,
            self.services.end_requests,
            state,
            self.scraper,
            allowed
            or HostAllowList.default(
                w.url for w in (*config.prefill, *config.decode, *config.pool)
            ),
            self.metrics.registry,
        )
        if self.admin.refusal is not None:
            log.warning("%s", self.admin.refusal)
        try:
            self.admin.save()  # the file names the workers the proxy starts with
        except ProxyError as exc:
            raise ConfigError(exc.message) from None
        self.api = self._build_api()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _forget(self, worker: Worker) -> None:
        """What the app keeps per worker beyond the policies: connections, decoder caches."""
        self.engine.forget(worker.url)
        if worker.role == "decode" and self.services.disagg is not None:
            self.services.disagg.forget(worker)
        if worker.role != "prefill" and self.kv_health is not None:
            self.kv_health.forget(worker.url)

    @property
    def pools(self) -> tuple[WorkerPool, WorkerPool, WorkerPool]:
        return self.services.router.pools

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.hot_paths.get(scope["path"])
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
        await self.services.connector.start()  # first: nothing to undo if its bind fails
        await self.engine.start()
        health = self.config.health
        await self.admin.start(health.probe_on_start, health.interval or 5.0)
        self._loop = asyncio.get_running_loop()
        # everything built so far lives as long as the process: keep it out of the cyclic
        # GC's scans, whose full passes over it stall the loop for milliseconds (p99 TTFT)
        gc.collect()
        gc.freeze()
        tasks = []
        if self.config.stats.interval > 0:
            tasks.append(asyncio.create_task(self._report_stats(self.config.stats.interval)))
        if self.config.health.interval > 0:
            tasks.append(asyncio.create_task(self._check_health(self.config.health.interval)))
        if self.scraper is not None:
            tasks.append(asyncio.create_task(self.scraper.run()))
        if self.kv_monitor is not None:
            tasks.append(asyncio.create_task(self.kv_monitor.run()))
        if self.pool_planner is not None and self.config.pool_mode == "adaptive":
            tasks.append(asyncio.create_task(self.pool_planner.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await self.admin.close()
            await self.services.connector.close()
            await self.engine.close()

    async def _report_stats(self, interval: float) -> None:
        stats = self.services.stats
        logged = 0
        while True:
            await asyncio.sleep(interval)
            if stats.recorded != logged:
                logged = stats.recorded
                log.info("%s", stats.report())

    async def _check_health(self, interval: float) -> None:
        while True:
            await self.check_workers()
            await asyncio.sleep(interval)

    async def check_workers(self) -> None:
        """Probe every worker's /health now and note the result on the worker."""
        timeout = self.config.health.timeout

        async def probe(pool: WorkerPool, worker: Worker) -> None:
            was = worker.health
            try:
                status, _ = await self.engine.get(worker, "/health", timeout)
            except ProxyError as exc:
                pool.record_check(worker, False, exc.message)
            else:
                pool.record_check(worker, status == 200, f"/health answered {status}")
            if worker.health is not was and was is not Health.UNKNOWN:
                log.warning("%s worker %s is now %s", pool.role, worker.url, worker.health.value)

        await asyncio.gather(*(probe(pool, w) for pool in self.pools for w in pool.members))
        for pool in self.pools:
            was = pool.panic
            pool.refresh()
            if pool.panic and not was:
                log.warning(
                    "every %s worker fails its health check: routing to them anyway", pool.role
                )
            elif was and not pool.panic:
                log.warning(
                    "a %s worker passes its health check again: panic routing off", pool.role
                )

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="pdproxy",
            version=__version__,
            lifespan=self.lifespan,
            docs_url=None,
            redoc_url=None,
        )

        @api.exception_handler(HTTPException)
        async def http_error(_: Request, exc: HTTPException) -> Response:
            if exc.status_code == 405:
                return _error(MethodNotAllowed("method not allowed on this path"))
            if exc.status_code == 404:
                return _error(NotFound("no such path; see /v1/models, /v1/completions, ..."))
            return _error(ProxyError(str(exc.detail)))

        @api.exception_handler(ProxyError)
        async def proxy_error(_: Request, exc: ProxyError) -> Response:
            return _error(exc)

        @api.exception_handler(RequestValidationError)
        async def validation_error(_: Request, exc: RequestValidationError) -> Response:
            return _error(ProxyError(str(exc)))

        @api.get("/health")
        async def health() -> Response:
            await self.check_workers()
            for pool in self.pools:
                pool.refresh()

            def healthy(*pools: WorkerPool) -> bool:
                return any(w.health is Health.HEALTHY for p in pools for w in p.workers)

            prefill, decode, pooled = self.pools
            # a request needs an engine that answers and, without a pool, one that prefills
            ok = healthy(decode, pooled) and (bool(self.config.pool) or healthy(prefill))
            status = "ok" if ok else "unavailable"
            if self.services.draining:
                ok, status = False, "draining"
            body = {"status": status, **self._members()}
            return _json(body, 200 if ok else 503)

        @api.get("/v1/models")
        async def models(request: Request) -> Response:
            self.services.auth.check_api(request.scope["headers"])
            return await self._models()

        @api.api_route("/v1/responses", methods=["GET", "POST", "DELETE"])
        @api.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"])
        async def responses(request: Request) -> Response:
            self.services.auth.check_api(request.scope["headers"])
            raise NotImplementedByProxy(RESPONSES_UNSUPPORTED, code="responses_api_not_supported")

        @api.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @api.get("/stats")
        async def stats(request: Request) -> Response:
            self.services.auth.check_admin(request.scope["headers"])
            summaries = self.services.stats.summaries()
            for pool in self.pools:
                pool.refresh()
            return _json(
                {
                    "requests": self.services.stats.recorded,
                    "latency_seconds": {
                        name: None if s is None else s.__dict__ for name, s in summaries.items()
                    },
                    "workers": self._members(),
                    "connector": self.services.connector.name,
                    "kv_transfer": {
                        w.url: w.kv_transfer.describe()
                        for pool in self.pools
                        for w in pool.members
                        if w.kv_transfer is not None
                    },
                    "pool": self._pool_info(),
                    "admission": {
                        "active": self.services.admission.active,
                        "queued": self.services.admission.queued,
                        "rejected": self.services.admission.rejected,
                    },
                    "draining": self.services.draining,
                    "policies": self._policies(),
                }
            )

        add_admin_routes(api, self.admin, self.services.timelines, self.pool_planner)
        feed = ConsoleFeed(
            self.admin,
            self.engine,
            self.services.stats,
            self.services.timelines,
            self.metrics.registry,
            self._console_info,
        )
        add_console_routes(api, feed, lambda: self.services.draining)
        return api

    def _console_info(self) -> dict[str, Any]:
        svc = self.services
        return {
            "connector": svc.connector.name,
            "policies": self._policies(),
            "pool": self._pool_info(),
            "admission": {
                "active": svc.admission.active,
                "queued": svc.admission.queued,
                "rejected": svc.admission.rejected,
            },
            "draining": svc.draining,
        }

    def _members(self) -> dict[str, list[dict[str, object]]]:
        return {pool.role: [w.describe() for w in pool.members] for pool in self.pools}

    def _policies(self) -> dict[str, object]:
        router = self.services.router
        return {
            "planner": self.services.plans.name,
            "prefill": router.prefill_policy.name,
            "decode": router.decode_policy.name,
            "conditional_disagg": self.config.conditional_disagg.enabled,
        }

    def _pool_info(self) -> dict[str, Any] | None:
        return None if self.pool_planner is None else self.pool_planner.describe()

    async def _models(self) -> Response:
        """The union of the decoders' models (the ones that serve the answer)."""
        # one snapshot (the pools may change while we wait): every engine that answers
        decoders = (*self.pools[1].workers, *self.pools[2].workers)
        results = await asyncio.gather(
            *(self.engine.get(w, "/v1/models", self.config.health.timeout) for w in decoders),
            return_exceptions=True,
        )
        seen: dict[str, Any] = {}
        errors = []
        for worker, result in zip(decoders, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(str(result))
                continue
            status, raw = result
            try:
                data = orjson.loads(raw)["data"] if status == 200 else None
            except (orjson.JSONDecodeError, KeyError, TypeError):
                data = None
            if not isinstance(data, list):
                errors.append(f"{worker.url}/v1/models answered {status}")
                continue
            for model in data:
                if isinstance(model, dict) and "id" in model:
                    seen.setdefault(model["id"], model)
        if not seen:
            return _error(UpstreamError("no decoder listed its models: " + "; ".join(errors)))
        return _json({"object": "list", "data": list(seen.values())})


def initial_workers(config: ProxyConfig, state: StateFile | None) -> WorkerRegistry:
    """The workers recorded in the state file when there is one (the set after the last change
    at run time), else the configured ones, ids in config order (p0, p1, ..., d0, ...)."""
    registry = WorkerRegistry.empty(config.health.failure_threshold, config.health.cooldown)
    records = state.read() if state is not None else None
    if records is not None:
        for record in records:
            receiver = record.receiver()
            if config.connector == "lmcache" and record.role == "decode" and receiver is None:
                raise StateError(
                    f"workers state file {state.path if state else ''}: decoder {record.id} has "
                    "no lmcache receiver, which connector lmcache needs"
                )
            registry.add(record.role, record.url, receiver, record.id)
        log.info(
            "workers from %s (the configured lists are not used while it exists): %s",
            state.path if state is not None else "",
            ", ".join(f"{r.id}={r.url}" for r in records) or "none",
        )
        return registry
    receivers: list[Receiver | None] = [None] * len(config.decode)
    if config.connector == "lmcache":
        receivers = list(resolve_receivers([(w.url, w.lmcache) for w in config.decode]))
    for spec in config.prefill:
        registry.add("prefill", spec.url)
    for spec, receiver in zip(config.decode, receivers, strict=True):
        registry.add("decode", spec.url, receiver)
    for spec in config.pool:
        registry.add("pool", spec.url)
    return registry


def build_app(config: ProxyConfig) -> ProxyApp:
    return ProxyApp(config)
