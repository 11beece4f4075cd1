"""The request path for /v1/completions and /v1/chat/completions, as one ASGI endpoint.

    read body -> parse -> [fan out: one sub-request per completion, proxy.fanout]
    -> admission -> plan: who decodes, who prefills (proxy.placement: the policies, or the
    pool planner) -> prefill leg (connector) -> decode leg (engine) -> relay -> record

The client's response starts only once the decoder has sent its first bytes, so every failure
before that is a proper HTTP error; after it, a failure ends the stream with an SSE error event.
A watcher task listens for the client's disconnect and cancels the work, which closes the engine
connections (vLLM aborts a request whose connection closes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import orjson

from proxy.config import FailoverConfig, FanoutConfig
from proxy.control.workers import Lease, Worker, serving
from proxy.engines.client import EngineClient, IdleTimeout, engine_errors
from proxy.engines.connectors.base import Connector, Handoff
from proxy.errors import (
    MethodNotAllowed,
    NoWorkerAvailable,
    PayloadTooLarge,
    ProxyError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.flow.fanout import FanOut
from proxy.flow.progress import Progress
from proxy.flow.relay import SSEScanner, sse_error_event
from proxy.flow.sink import Sink
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import LatencyStats, RequestTiming
from proxy.observe.timeline import TimelineRing
from proxy.place.disagg import DisaggPlanner
from proxy.place.plan import Plan, Planner, Router, RouterPlanner
from proxy.place.policies import RequestInfo
from proxy.place.prefix import prompt_prefix
from proxy.request import ClientRequest, check_request_id, parse_request
from proxy.serve.admission import Admission
from proxy.serve.auth import Authenticator

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("pdproxy")

JSON = b"application/json"
SSE = b"text/event-stream"


@dataclass
class Services:
    """What the request path needs; built by the app factory, one set per app."""

    router: Router
    connector: Connector
    engine: EngineClient
    metrics: ProxyMetrics
    stats: LatencyStats
    admission: Admission
    auth: Authenticator
    failover: FailoverConfig
    max_body_bytes: int
    decode_first_byte_timeout: float
    decode_idle_timeout: float
    prefix_chars: int = 0  # prompt characters the policies hash (0: none needs them)
    disagg: DisaggPlanner | None = None  # conditional disaggregation, when enabled
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    timelines: TimelineRing = field(default_factory=TimelineRing)  # recent requests, bounded
    planner: Planner | None = None  # who prefills and who decodes; None: the router's policies
    draining: bool = False
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    ended: dict[asyncio.Task[Any], str] = field(default_factory=dict)  # task -> why, until it ends

    def __post_init__(self) -> None:
        if self.planner is None:
            self.planner = RouterPlanner(self.router)

    @property
    def plans(self) -> Planner:
        assert self.planner is not None
        return self.planner

    def end_requests(self, tasks: Iterable[asyncio.Task[Any]], reason: str) -> None:
        """End these requests now; each client gets an error saying `reason`."""
        for task in tasks:
            if task in self.inflight and task not in self.ended:
                self.ended[task] = reason
                task.cancel()

    def end_inflight(self) -> None:
        """The drain deadline passed: end every request still in flight (with an error)."""
        self.end_requests(list(self.inflight), "the proxy shut down before the answer was complete")


class Responder:
    """Sends the client's response; knows whether it has started."""

    __slots__ = ("_send", "complete", "failure", "request_id", "started", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.failure: str | None = None  # the error message the client got
        self.started = False
        self.complete = False  # the last byte was handed to the server
        self.status = 0

    def _headers(self, content_type: bytes, length: int | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode())]
        if length is None:
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"content-length", str(length).encode()))
        return headers

    async def whole(self, status: int, body: bytes, content_type: bytes = JSON) -> None:
        self.started = True
        self.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._headers(content_type, len(body)),
            }
        )
        self.complete = True
        await self._send({"type": "http.response.body", "body": body})

    async def start_stream(self) -> None:
        await self.start(200, SSE, None)

    async def start(self, status: int, content_type: bytes, length: int | None) -> None:
        """Start a response whose body follows in `chunk`s and `end`."""
        self.started = True
        self.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._headers(content_type, length),
            }
        )

    async def chunk(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.complete = True
        await self._send({"type": "http.response.body", "body": data})

    async def error(self, exc: ProxyError) -> None:
        self.failure = exc.message
        if self.started:
            await self.end(sse_error_event(exc.body()))
            return
        body = exc.body()
        self.started = True
        self.status = exc.status
        headers = self._headers(JSON, len(body))
        if isinstance(exc, TooManyRequests):
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        await self._send({"type": "http.response.start", "status": exc.status, "headers": headers})
        self.complete = True
        await self._send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def request_header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


class CompletionEndpoint:
    """ASGI app for one OpenAI generation path."""

    def __init__(self, services: Services, path: str) -> None:
        self.services = services
        self.path = path
        self.fanout = FanOut(
            self.run, services.fanout.max_batch_prompts, services.fanout.max_parallel
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timing = RequestTiming(start=perf_counter())
        out = Responder(send, "")
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{self.path} accepts POST only")
            self.services.auth.check_api(scope["headers"])
            if self.services.draining:
                raise NoWorkerAvailable("the proxy is shutting down; send the request elsewhere")
            out.request_id = check_request_id(request_header(scope, b"x-request-id"))
            raw = await read_body(receive, scope, self.services.max_body_bytes)
            priority = request_header(scope, b"x-vllm-priority")
            request = parse_request(self.path, raw, out.request_id, priority)
        except ProxyError as exc:
            await out.error(exc)
            self._finish(out, timing)
            return
        except asyncio.CancelledError:
            return  # the client left while sending its body
        await self._run_watched(request, receive, out, timing)

    async def _run_watched(
        self, request: ClientRequest, receive: Receive, out: Responder, timing: RequestTiming
    ) -> None:
        """Serve in this task, while a watcher task waits for the client's disconnect and then
        cancels it (as the drain deadline does, through `services.inflight`)."""
        progress = Progress()
        timing.stream = request.stream
        task = asyncio.current_task()
        assert task is not None
        serving.set(task)  # what a worker's drain ends, also from sub-requests' tasks
        client_left = False

        async def watch() -> None:
            nonlocal client_left
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    # the server also says "disconnect" once the response is complete; once
                    # serving ends, the watcher is cancelled before it could look
                    if not out.complete:
                        client_left = True
                        phase = progress.current()
                        self.services.metrics.disconnects.labels(phase).inc()
                        log.info("request %s: client left during %s", request.request_id, phase)
                        task.cancel()
                    return

        self.services.inflight.add(task)
        watcher = asyncio.create_task(watch())
        try:
            await self._serve(request, out, timing, progress)
        except asyncio.CancelledError:
            ended = self.services.ended.pop(task, None)
            if not (client_left or ended):
                raise  # cancelled by the server itself: not ours to swallow
            task.uncancel()
            if client_left:
                out.status = 499  # nginx's "client closed request", for the metrics only
            else:
                await out.error(UpstreamError(ended or ""))
        finally:
            self.services.inflight.discard(task)
            self.services.ended.pop(task, None)
            watcher.cancel()
            self._finish(out, timing)

    def _finish(self, out: Responder, timing: RequestTiming) -> None:
        timing.end = perf_counter()
        timing.path, timing.request_id, timing.status = self.path, out.request_id, out.status
        timing.error = out.failure
        self.services.stats.record(timing)
        self.services.timelines.add(timing)
        self.services.metrics.requests.labels(self.path, str(out.status)).inc()

    async def _serve(
        self, request: ClientRequest, out: Responder, timing: RequestTiming, progress: Progress
    ) -> None:
        try:
            if request.fanout > 1:
                await self.fanout.serve(request, out, timing, progress)
            else:
                await self.run(request, out, timing, progress)
        except ProxyError as exc:
            if exc.status >= 500:
                log.warning("request %s failed: %s", request.request_id, exc.message)
            await out.error(exc)

    async def run(
        self, request: ClientRequest, out: Sink, timing: RequestTiming, progress: Progress
    ) -> None:
        """One request, or one sub-request of a fanned-out one, through admission (at its
        priority) and disaggregated serving; raises ProxyError."""
        async with self.services.admission.slot(request.priority):
            timing.admitted = perf_counter()
            await self._proxy(request, out, timing, progress)

    async def _proxy(
        self, request: ClientRequest, out: Sink, timing: RequestTiming, progress: Progress
    ) -> None:
        """Plan, prefill (with failover), then decode (retried on another decoder before any
        byte reached the client). Nothing is retried after a 4xx: that is the client's to fix."""
        svc = self.services
        prefix = (
            prompt_prefix(request.path, request.body, svc.prefix_chars) if svc.prefix_chars else ""
        )
        info = RequestInfo(request.request_id, request.prompt_chars, prefix)
        plan = await svc.plans.plan(request, info)
        timing.plan = plan
        decoder = plan.decoder
        local_tokens = (plan.tokens or 0) if plan.prefill == "local" else 0
        tried: list[Worker] = []
        handoff: Handoff | None = None
        body = b""
        while True:
            with svc.router.track(decoder, request.prompt_chars, local_tokens) as lease:
                if handoff is None:
                    handoff = await self._plan_prefill(request, plan, info, timing)
                    body = svc.connector.decode_body(request, handoff)
                    timing.kv = handoff.outcome
                    # KV now waits on the prefiller for the decoder: a client that leaves before
                    # the first decoded byte closes the decode leg, and the decoder's abort frees
                    # the prefiller's blocks (vLLM; see README "Cancellation")
                    progress.phase = "handoff" if handoff.kv_transfer_params else "decode"
                timing.decoder = decoder.id
                lease.decoding()
                try:
                    await self._decode(request, decoder, body, out, timing, progress, lease)
                except (UpstreamError, UpstreamTimeout) as exc:
                    self._failed(decoder, exc)
                    if out.started or len(tried) >= svc.failover.decode_retries:
                        raise
                    last = exc
                else:
                    svc.router.pool_of(decoder).record_success(decoder)
                    return
            tried.append(decoder)
            if plan.prefiller is not None:  # its KV is for another engine than its own
                tried.append(plan.prefiller)
            replacement = svc.plans.pick_decode(info, tried)
            if replacement is None:
                raise last
            svc.metrics.retries.labels("decode").inc()
            timing.retries += 1
            log.warning(
                "request %s: decode on %s failed (%s); retrying on %s",
                request.request_id,
                decoder.url,
                last.message,
                replacement.url,
            )
            decoder = replacement

    async def _plan_prefill(
        self, request: ClientRequest, plan: Plan, info: RequestInfo, timing: RequestTiming
    ) -> Handoff:
        """The prefill leg, unless the decoder must or should prefill the prompt itself: the
        plan says so (the pool planner), or, when the plan leaves it open, a request for prompt
        logprobs or a beam search (see ClientRequest.local_reason), or a prompt that
        conditional disaggregation keeps local. None of these is a recompute."""
        svc = self.services
        if plan.prefill == "local":
            return Handoff(None)
        if plan.prefill is None:
            if request.local_reason is not None:
                svc.metrics.disagg_decisions.labels("local", request.local_reason).inc()
                timing.plan = Plan(plan.decoder, prefill="local", reason=request.local_reason)
                return Handoff(None)
            if svc.disagg is not None:
                decision = await svc.disagg.plan(request, plan.decoder, info)
                timing.plan = Plan(
                    plan.decoder,
                    prefill="remote" if decision.remote_prefill else "local",
                    reason=decision.reason,
                )
                if not decision.remote_prefill:
                    return Handoff(None)
        return await self._prefill(request, plan, info, timing)

    async def _prefill(
        self, request: ClientRequest, plan: Plan, info: RequestInfo, timing: RequestTiming
    ) -> Handoff:
        """The prefill leg on the planned prefiller (else the planner's choice), then on others
        if it fails; with none left, a decoder-local prefill when allowed (counted as a
        fallback)."""
        svc = self.services
        decoder = plan.decoder
        tried: list[Worker] = [decoder]  # a pool engine never prefills for itself
        last: ProxyError | None = None
        timing.prefill_start = perf_counter()
        for attempt in range(svc.failover.prefill_retries + 1):
            if attempt == 0 and plan.prefiller is not None:
                prefiller: Worker | None = plan.prefiller
            else:
                prefiller = svc.plans.pick_prefill(info, tried)
            if prefiller is None:
                break
            timing.prefiller = prefiller.id
            if attempt:
                svc.metrics.retries.labels("prefill").inc()
                timing.retries += 1
                log.warning(
                    "request %s: retrying prefill on %s after: %s",
                    request.request_id,
                    prefiller.url,
                    last.message if last else "",
                )
            with svc.router.track(prefiller, request.prompt_chars, plan.tokens or 0):
                try:
                    handoff = await svc.connector.prefill(request, prefiller, decoder)
                except (UpstreamError, UpstreamTimeout) as exc:
                    self._failed(prefiller, exc)
                    tried.append(prefiller)
                    last = exc
                    continue
            svc.router.pool_of(prefiller).record_success(prefiller)
            timing.prefill_end = perf_counter()
            if handoff.recompute_reason is not None:
                svc.metrics.recompute.labels(handoff.recompute_kind).inc()
                log.warning(
                    "request %s: KV not handed over, decoder %s will recompute the prompt: %s",
                    request.request_id,
                    decoder.url,
                    handoff.recompute_reason,
                )
            return handoff
        if not svc.failover.fallback_local_prefill:
            raise last or NoWorkerAvailable("no prefill worker is available")
        reason = "prefill_failed" if last else "no_prefiller"
        why = last.message if last else "no prefill worker is available"
        svc.metrics.fallbacks.labels(reason).inc()
        log.warning(
            "request %s: falling back to prefill on decoder %s: %s",
            request.request_id,
            decoder.url,
            why,
        )
        timing.prefill_start = None
        return Handoff(None, why, reason)

    async def _decode(
        self,
        request: ClientRequest,
        decoder: Worker,
        body: bytes,
        out: Sink,
        timing: RequestTiming,
        progress: Progress,
        lease: Lease,
    ) -> None:
        svc = self.services
        if request.stream:
            await self._stream(request, decoder, body, out, timing, progress, lease)
            return
        raw = await svc.engine.call(
            decoder,
            request.path,
            body,
            request.request_id,
            svc.decode_first_byte_timeout,
            "decode",
        )
        timing.first_token = timing.last_token = perf_counter()
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"decode: decode worker {decoder.url} answered with a body that is not JSON"
            ) from None
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            timing.output_tokens = usage["completion_tokens"]
        await out.whole(200, raw)

    def _failed(self, worker: Worker, exc: ProxyError) -> None:
        self.services.router.pool_of(worker).record_failure(worker, exc.message)
        log.info("%s worker %s failed: %s", worker.role, worker.url, exc.message)
        self.services.metrics.upstream_failures.labels(worker.role, exc.type).inc()

    async def _stream(
        self,
        request: ClientRequest,
        decoder: Worker,
        body: bytes,
        out: Sink,
        timing: RequestTiming,
        progress: Progress,
        lease: Lease,
    ) -> None:
        svc = self.services
        stream, data = await svc.engine.open_stream(
            decoder, request.path, body, request.request_id, svc.decode_first_byte_timeout
        )
        scanner = SSEScanner()
        try:
            with engine_errors(decoder, "decode"):
                async with IdleTimeout(svc.decode_idle_timeout) as idle:
                    read = stream.read
                    events = scanner.feed(data, perf_counter())
                    while not events and data:  # the first whole event decides how we answer
                        data = await read()
                        idle.last = now = perf_counter()
                        events = scanner.feed(data, now)
                    if scanner.malformed is not None or not events:
                        raise UpstreamError(
                            f"decode: decode worker {decoder.url} sent a malformed stream: "
                            f"{(scanner.malformed or scanner.pending)[:80]!r}"
                        )
                    progress.phase = "decode"
                    lease.prefilled()
                    await out.start_stream()
                    while not scanner.done:
                        if events:
                            await out.chunk(events)
                        data = await read()
                        if not data:
                            break
                        idle.last = now = perf_counter()
                        events = scanner.feed(data, now)
                    if scanner.done:
                        await out.end(events)  # the last events and the end: one write
                        while await read():  # to the end, so the connection is reused
                            idle.last = perf_counter()
            if not scanner.done:
                raise UpstreamError(
                    f"decode: decode worker {decoder.url} ended the stream without [DONE]"
                )
        finally:
            timing.first_token = scanner.first_token
            timing.last_token = scanner.last_token
            timing.token_events = scanner.token_events
            usage = scanner.usage
            tokens = usage.get("completion_tokens") if usage is not None else None
            timing.output_tokens = tokens if isinstance(tokens, int) else scanner.token_events
            stream.close()
