"""The ASGI endpoint of /v1/completions and /v1/chat/completions: the request path's edge.

    read body -> parse (proxy.request) -> [fan out: one sub-request per completion,
    proxy.flow.fanout] -> admission, at the request's priority -> the legs (proxy.flow.legs:
    plan, prefill, hand-off, decode, relay) -> record

The client's response starts only once the decoder has sent its first bytes, so every failure
before that is a proper HTTP error; after it, a failure ends the stream with an SSE error event.
A watcher task listens for the client's disconnect and cancels the work, which closes the engine
connections (vLLM aborts a request whose connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from proxy.auth import Authenticator
from proxy.config import FanoutConfig
from proxy.errors import (
    MethodNotAllowed,
    NoWorkerAvailable,
    ProxyError,
    TooManyRequests,
    UpstreamError,
)
from proxy.flow.fanout import FanOut
from proxy.flow.legs import Flow, Legs
from proxy.flow.progress import Progress
from proxy.flow.sink import Sink
from proxy.observe.stats import LatencyStats, RequestTiming
from proxy.observe.timeline import TimelineRing
from proxy.request import REQUEST_ID_PREFIX, ClientRequest, check_request_id, parse_request
from proxy.serve.admission import Gate
from proxy.serve.responder import Receive, Responder, Scope, Send, read_body, request_header

log = logging.getLogger("pdproxy")


@dataclass
class Services:
    """What the edge needs; built by the app factory, one set per app."""

    flow: Flow
    stats: LatencyStats
    admission: Gate  # proxy.serve.admission.Admission, or the serving processes' shared one
    auth: Authenticator
    max_body_bytes: int
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    timelines: TimelineRing = field(default_factory=TimelineRing)  # recent requests, bounded
    draining: bool = False
    # what the ids the proxy makes start with: a serving process adds its name (`pdp-w2-`,
    # proxy.procs.serving), so that an answer's X-Request-Id says which process served it
    request_id_prefix: str = REQUEST_ID_PREFIX
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    ended: dict[asyncio.Task[Any], str] = field(default_factory=dict)  # task -> why, until it ends
    # where a finished request's timing goes instead of `stats` and `timelines`: a serving
    # process reports it, and the control process records every process's (proxy.procs.report)
    reporter: Callable[[RequestTiming], None] | None = None

    def record(self, timing: RequestTiming) -> None:
        """A request finished: its timing into the latency stats and the timelines."""
        if self.reporter is not None:
            self.reporter(timing)
        else:
            self.stats.record(timing)
            self.timelines.add(timing)

    def end_requests(self, tasks: Iterable[asyncio.Task[Any]], reason: str) -> None:
        """End these requests now; each client gets an error saying `reason`."""
        for task in tasks:
            if task in self.inflight and task not in self.ended:
                self.ended[task] = reason
                task.cancel()

    def end_inflight(self) -> None:
        """The drain deadline passed: end every request still in flight (with an error)."""
        self.end_requests(list(self.inflight), "the proxy shut down before the answer was complete")


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
            out.request_id = check_request_id(
                request_header(scope, b"x-request-id"), self.services.request_id_prefix
            )
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
                        self.services.flow.metrics.disconnects.labels(phase).inc()
                        log.info("request %s: client left during %s", request.request_id, phase)
                        task.cancel()
                    return

        self.services.inflight.add(task)
        watcher = asyncio.create_task(watch())
        try:
            await self._serve(request, out, timing, progress, task)
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
        self.services.record(timing)
        self.services.flow.metrics.requests.labels(self.path, str(out.status)).inc()

    async def _serve(
        self,
        request: ClientRequest,
        out: Responder,
        timing: RequestTiming,
        progress: Progress,
        owner: asyncio.Task[Any],
    ) -> None:
        try:
            if request.fanout > 1:
                await self.fanout.serve(request, out, timing, progress, owner)
            else:
                await self.run(request, out, timing, progress, owner)
        except ProxyError as exc:
            if exc.status >= 500:
                log.warning("request %s failed: %s", request.request_id, exc.message)
            await out.error(exc)

    async def run(
        self,
        request: ClientRequest,
        out: Sink,
        timing: RequestTiming,
        progress: Progress,
        owner: asyncio.Task[Any] | None,
    ) -> None:
        """One request, or one sub-request of a fanned-out one, through admission (at its
        priority) and its legs; raises ProxyError."""
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(self.services.admission.slot(request.priority))
            except TooManyRequests:
                self.services.flow.metrics.rejected.inc()
                raise
            timing.admitted = perf_counter()
            await Legs(self.services.flow, request, out, timing, progress, owner).run()
