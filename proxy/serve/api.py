"""The proxy's HTTP surface beside the generation paths, on FastAPI: /health, /v1/models, the
Responses API's refusal, /metrics, /stats, and the admin API and the console (proxy.control).
Errors are rendered once, as OpenAI-shaped JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from proxy import __version__
from proxy.config import ProxyConfig
from proxy.control.admin.routes import add_admin_routes
from proxy.control.console import add_console_routes
from proxy.control.console.feed import ConsoleFeed
from proxy.control.plane import ControlPlane
from proxy.control.pool import PoolController
from proxy.control.workers import Health, WorkerPool
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector
from proxy.errors import (
    MethodNotAllowed,
    NotFound,
    NotImplementedByProxy,
    ProxyError,
    UpstreamError,
)
from proxy.observe.metrics import ProxyMetrics
from proxy.serve.endpoint import Services
from proxy.serve.passthrough import RESPONSES_UNSUPPORTED
from proxy.serve.plane import DataPlane


class Companion(Protocol):
    """What lives as long as the app beside its two planes (proxy.app.ProxyApp.companions)."""

    async def start(self) -> None:
        """After the control plane started."""

    async def close(self) -> None:
        """Before the control plane closes."""

    def begin_drain(self) -> None:
        """SIGTERM/SIGINT arrived; called from the signal handler."""

    def describe(self) -> dict[str, Any]:
        """Its part of /stats."""


class App(Protocol):
    """What the surface reads of the app (proxy.app.ProxyApp)."""

    config: ProxyConfig
    pools: tuple[WorkerPool, WorkerPool, WorkerPool]
    services: Services
    plane: DataPlane
    control: ControlPlane
    pool: PoolController | None
    metrics: ProxyMetrics
    engine: EngineClient
    connector: Connector
    companions: list[Companion]


Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(exc: ProxyError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json")


def build_api(app: App, lifespan: Lifespan) -> FastAPI:
    api = FastAPI(
        title="pdproxy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    _error_handlers(api)
    views = Views(app)
    services = app.services

    @api.get("/health")
    async def health() -> Response:
        await app.control.health.check()
        return views.health()

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        services.auth.check_api(request.scope["headers"])
        return await views.models()

    @api.api_route("/v1/responses", methods=["GET", "POST", "DELETE"])
    @api.api_route("/v1/responses/{rest:path}", methods=["GET", "POST", "DELETE"])
    async def responses(request: Request) -> Response:
        services.auth.check_api(request.scope["headers"])
        raise NotImplementedByProxy(RESPONSES_UNSUPPORTED, code="responses_api_not_supported")

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(app.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/stats")
    async def stats(request: Request) -> Response:
        services.auth.check_admin(request.scope["headers"])
        return _json(views.stats())

    add_admin_routes(api, app.control.admin, services.timelines, app.pool, app.control.kv_events)
    feed = ConsoleFeed(
        app.control.admin,
        app.engine,
        services.stats,
        services.timelines,
        app.metrics.registry,
        views.console,
    )
    add_console_routes(api, feed, lambda: services.draining)
    return api


def _error_handlers(api: FastAPI) -> None:
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


class Views:
    """What the endpoints above say about the proxy, read from both planes."""

    def __init__(self, app: App) -> None:
        self.app = app

    def members(self) -> dict[str, list[dict[str, object]]]:
        for pool in self.app.pools:
            pool.refresh()
        return {pool.role: [w.describe() for w in pool.members] for pool in self.app.pools}

    def health(self) -> Response:
        members = self.members()

        def healthy(*pools: WorkerPool) -> bool:
            return any(w.health is Health.HEALTHY for p in pools for w in p.workers)

        prefill, decode, pooled = self.app.pools
        # a request needs an engine that answers and, without a pool, one that prefills
        ok = healthy(decode, pooled) and (self.app.config.has_pool or healthy(prefill))
        status = "ok" if ok else "unavailable"
        if self.app.services.draining:
            ok, status = False, "draining"
        return _json({"status": status, **members}, 200 if ok else 503)

    def policies(self) -> dict[str, object]:
        router = self.app.plane.router
        return {
            "planner": self.app.plane.planner.name,
            "prefill": router.prefill_policy.name,
            "decode": router.decode_policy.name,
            "conditional_disagg": self.app.config.conditional_disagg.enabled,
        }

    def console(self) -> dict[str, Any]:
        """The proxy-wide part of the console's snapshot (and of /stats)."""
        services = self.app.services
        return {
            "connector": self.app.connector.name,
            "policies": self.policies(),
            "pool": None if self.app.pool is None else self.app.pool.describe(),
            "admission": {
                "active": services.admission.active,
                "queued": services.admission.queued,
                "rejected": services.admission.rejected,
            },
            "draining": services.draining,
        }

    def stats(self) -> dict[str, Any]:
        stats = self.app.services.stats
        summaries = stats.summaries()
        members = self.members()
        return {
            "requests": stats.recorded,
            "latency_seconds": {
                name: None if s is None else s.__dict__ for name, s in summaries.items()
            },
            "workers": members,
            "kv_transfer": {
                w.url: w.kv_transfer.describe()
                for pool in self.app.pools
                for w in pool.members
                if w.kv_transfer is not None
            },
            **self.console(),
            **{k: v for c in self.app.companions for k, v in c.describe().items()},
        }

    async def models(self) -> Response:
        """The union of the decoders' models (the ones that serve the answer)."""
        # one snapshot (the pools may change while we wait): every engine that answers
        decoders = (*self.app.pools[1].workers, *self.app.pools[2].workers)
        timeout = self.app.config.health.timeout
        results = await asyncio.gather(
            *(self.app.engine.get(w, "/v1/models", timeout) for w in decoders),
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
