"""The app factory: everything a proxy instance owns is built here and torn down in its lifespan.

The two generation paths are served by `CompletionEndpoint` directly (a front dispatcher sends them
there before any framework code runs); FastAPI serves the control endpoints and the OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from proxy import __version__
from proxy.config import ProxyConfig
from proxy.connectors import make_connector
from proxy.engine import EngineClient
from proxy.errors import MethodNotAllowed, NotFound, ProxyError, UpstreamError
from proxy.handler import CompletionEndpoint, Receive, Router, Scope, Send, Services
from proxy.metrics import ProxyMetrics
from proxy.policies import make_policy
from proxy.request import CHAT, COMPLETIONS
from proxy.stats import LatencyStats
from proxy.workers import Health, Worker, WorkerPool

log = logging.getLogger("pdproxy")

HEALTH_TIMEOUT = 2.0


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(exc: ProxyError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json")


class ProxyApp:
    """One proxy instance: its config, workers, services, and the ASGI callable serving them."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.engine = EngineClient(config.timeouts.connect, config.engine_api_key)
        prefill = WorkerPool.from_urls("prefill", [w.url for w in config.prefill])
        decode = WorkerPool.from_urls("decode", [w.url for w in config.decode])
        self.metrics = ProxyMetrics((prefill, decode))
        self.services = Services(
            router=Router(
                prefill,
                decode,
                make_policy(config.prefill_policy),
                make_policy(config.decode_policy),
            ),
            connector=make_connector(config, self.engine, self.metrics.registry),
            engine=self.engine,
            metrics=self.metrics,
            stats=LatencyStats(config.stats.window, self.metrics.registry),
            max_body_bytes=config.max_body_bytes,
            decode_first_byte_timeout=config.timeouts.decode_first_byte,
            decode_idle_timeout=config.timeouts.decode_idle,
        )
        self.hot_paths = {
            CHAT: CompletionEndpoint(self.services, CHAT),
            COMPLETIONS: CompletionEndpoint(self.services, COMPLETIONS),
        }
        self.api = self._build_api()

    @property
    def pools(self) -> tuple[WorkerPool, WorkerPool]:
        return self.services.router.prefill, self.services.router.decode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.hot_paths.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.api(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        await self.services.connector.start()  # first: nothing to undo if its bind fails
        await self.engine.start()
        reporter = None
        if self.config.stats.interval > 0:
            reporter = asyncio.create_task(self._report_stats(self.config.stats.interval))
        try:
            yield
        finally:
            if reporter is not None:
                reporter.cancel()
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

    async def check_workers(self) -> None:
        """Probe every worker's /health now and note the result on the worker."""

        async def probe(worker: Worker) -> None:
            try:
                status, _ = await self.engine.get(worker, "/health", HEALTH_TIMEOUT)
            except ProxyError as exc:
                worker.health, worker.last_error = Health.UNHEALTHY, exc.message
                return
            worker.health = Health.HEALTHY if status == 200 else Health.UNHEALTHY
            if status != 200:
                worker.last_error = f"/health answered {status}"

        await asyncio.gather(*(probe(w) for pool in self.pools for w in pool.workers))

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

        @api.exception_handler(RequestValidationError)
        async def validation_error(_: Request, exc: RequestValidationError) -> Response:
            return _error(ProxyError(str(exc)))

        @api.get("/health")
        async def health() -> Response:
            await self.check_workers()
            prefill, decode = self.pools
            ok = all(
                any(w.health is Health.HEALTHY for w in pool.workers) for pool in (prefill, decode)
            )
            body = {
                "status": "ok" if ok else "unavailable",
                "prefill": [w.describe() for w in prefill.workers],
                "decode": [w.describe() for w in decode.workers],
            }
            return _json(body, 200 if ok else 503)

        @api.get("/v1/models")
        async def models() -> Response:
            return await self._models()

        @api.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @api.get("/stats")
        async def stats() -> Response:
            summaries = self.services.stats.summaries()
            prefill, decode = self.pools
            return _json(
                {
                    "requests": self.services.stats.recorded,
                    "latency_seconds": {
                        name: None if s is None else s.__dict__ for name, s in summaries.items()
                    },
                    "workers": {
                        "prefill": [w.describe() for w in prefill.workers],
                        "decode": [w.describe() for w in decode.workers],
                    },
                    "connector": self.services.connector.name,
                    "policies": {
                        "prefill": self.services.router.prefill_policy.name,
                        "decode": self.services.router.decode_policy.name,
                    },
                }
            )

        return api

    async def _models(self) -> Response:
        """The union of the decoders' models (the ones that serve the answer)."""
        _, decode = self.pools
        results = await asyncio.gather(
            *(self.engine.get(w, "/v1/models", HEALTH_TIMEOUT) for w in decode.workers),
            return_exceptions=True,
        )
        seen: dict[str, Any] = {}
        errors = []
        for worker, result in zip(decode.workers, results, strict=True):
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


def build_app(config: ProxyConfig) -> ProxyApp:
    return ProxyApp(config)
