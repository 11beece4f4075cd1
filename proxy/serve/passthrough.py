"""vLLM's other HTTP endpoints, passed to a decoder unchanged.

Tokenizing, version and (when the engines serve a pooling model) embeddings, pooling, scoring
and reranking need no prefill leg: the request goes to a decoder (chosen by the decode policy)
as the client sent it, and the decoder's status, content type and body come back as they are,
streamed as they arrive. An engine that does not serve a path answers its own 404 (vLLM mounts
the pooling routes only for a pooling model). Only a transport failure is the proxy's to
report: it is retried on another decoder before any byte reached the client, then a 502/504.

The Responses API is not passed through: its 501 (`RESPONSES_UNSUPPORTED`) says why and what to
use instead.
"""

from __future__ import annotations

import logging
from time import perf_counter

from proxy.control.workers import Worker
from proxy.engines.client import IdleTimeout, engine_errors
from proxy.errors import (
    MethodNotAllowed,
    NoWorkerAvailable,
    ProxyError,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.observe.stats import RequestTiming
from proxy.place.policies import RequestInfo
from proxy.request import check_request_id
from proxy.serve.endpoint import Services
from proxy.serve.responder import JSON, Receive, Responder, Scope, Send, read_body, request_header

log = logging.getLogger("pdproxy")

# path -> method, as vLLM 0.32 serves them (vllm/entrypoints/serve, .../pooling)
ROUTES = {
    "/tokenize": b"POST",
    "/detokenize": b"POST",
    "/version": b"GET",
    "/tokenizer_info": b"GET",
    "/v1/embeddings": b"POST",
    "/v2/embed": b"POST",
    "/pooling": b"POST",
    "/classify": b"POST",
    "/score": b"POST",
    "/v1/score": b"POST",
    "/rerank": b"POST",
    "/v1/rerank": b"POST",
    "/v2/rerank": b"POST",
}
OPEN = frozenset({"/version"})  # answered without an API key, like /health


class PassThrough:
    """ASGI app for one passed-through path."""

    def __init__(self, services: Services, path: str, method: bytes) -> None:
        self.services = services
        self.path = path
        self.method = method

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc = self.services
        timing = RequestTiming(start=perf_counter())
        out = Responder(send, "")
        try:
            if scope["method"].encode() != self.method:
                raise MethodNotAllowed(f"{self.path} accepts {self.method.decode()} only")
            if self.path not in OPEN:
                svc.auth.check_api(scope["headers"])
            if svc.draining:
                raise NoWorkerAvailable("the proxy is shutting down; send the request elsewhere")
            out.request_id = check_request_id(
                request_header(scope, b"x-request-id"), svc.request_id_prefix
            )
            body = b""
            if self.method != b"GET":
                body = await read_body(receive, scope, svc.max_body_bytes)
            await self._forward(scope, body, out)
        except ProxyError as exc:
            if exc.status >= 500:
                log.warning("%s %s failed: %s", self.path, out.request_id, exc.message)
            await out.error(exc)
        finally:
            timing.end = perf_counter()
            svc.flow.metrics.requests.labels(self.path, str(out.status or 499)).inc()

    async def _forward(self, scope: Scope, body: bytes, out: Responder) -> None:
        flow = self.services.flow
        info = RequestInfo(out.request_id, len(body))
        content_type = request_header(scope, b"content-type") or JSON
        tried: list[Worker] = []
        last: ProxyError = NoWorkerAvailable("no decode worker is available")
        while True:
            worker = flow.planner.another("decode", info, tried)
            if worker is None:
                raise last
            pool = flow.router.pool_of(worker)
            with pool.track(worker, len(body)):
                try:
                    await self._relay(worker, body, content_type, out)
                except (UpstreamError, UpstreamTimeout) as exc:
                    pool.record_failure(worker, exc.message)
                    flow.metrics.upstream_failures.labels(pool.role, exc.type).inc()
                    if out.started or len(tried) >= flow.failover.decode_retries:
                        raise
                    last = exc
                    tried.append(worker)
                    continue
            pool.record_success(worker)
            return

    async def _relay(
        self, worker: Worker, body: bytes, content_type: bytes, out: Responder
    ) -> None:
        flow = self.services.flow
        stream, status, engine_type, length = await flow.engine.forward(
            worker,
            self.method,
            self.path,
            body,
            content_type,
            out.request_id,
            flow.first_byte_timeout,
        )
        try:
            size = int(length) if length is not None and length.isdigit() else None
            await out.start(status, engine_type or JSON, size)
            with engine_errors(worker, f"{self.method.decode()} {self.path}"):
                async with IdleTimeout(flow.idle_timeout) as idle:
                    while data := await stream.read():
                        idle.last = perf_counter()
                        await out.chunk(data)
            await out.end()
        finally:
            stream.close()


RESPONSES_UNSUPPORTED = (
    "pdproxy does not serve the Responses API. vLLM keeps responses (store, "
    "previous_response_id, background, GET /v1/responses/{id}, cancel) in the memory of the one "
    "engine that made them, so a conversation cannot be split between a prefiller and a decoder, "
    "and its event stream is not a chat stream. Use POST /v1/chat/completions (or "
    "/v1/completions), which pdproxy serves with disaggregated prefill."
)
