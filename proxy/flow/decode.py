"""The decode leg on one decoder: the answer read whole, or its stream relayed event by event.

The client's response starts only once the decoder's first whole event arrived, so a failure
before it is still an ordinary error response (and can be retried on another decoder); after
it, a failure ends the stream (the caller sends the SSE error event).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Protocol

import orjson

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient, EngineStream, IdleTimeout, engine_errors
from proxy.errors import UpstreamError
from proxy.flow.relay import SSEScanner
from proxy.flow.sink import Sink
from proxy.observe.stats import RequestTiming
from proxy.request import ClientRequest


class Watch(Protocol):
    """What sees a stream's events go by (proxy.flow.migrate.Transcript)."""

    @property
    def broken(self) -> UpstreamError | None: ...

    def feed(self, events: bytes) -> bytes: ...


async def decode_whole(
    engine: EngineClient,
    request: ClientRequest,
    decoder: Worker,
    body: bytes,
    out: Sink,
    timing: RequestTiming,
    timeout: float,
) -> None:
    raw = await engine.call(decoder, request.path, body, request.request_id, timeout, "decode")
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


async def relay_stream(
    stream: EngineStream,
    data: bytes,
    decoder: Worker,
    out: Sink,
    timing: RequestTiming,
    idle_timeout: float,
    on_first_event: Callable[[], None],
    watch: Watch | None = None,
) -> None:
    """Relay `stream` (whose first bytes are `data`) to `out` until `data: [DONE]`; closes the
    stream. `on_first_event` runs once the first whole event is in, before the client's
    response starts. `watch` sees every batch of whole events and returns what goes on to the
    client (proxy.flow.migrate.Transcript); when it says the stream is `broken`, what came
    before goes on and its error is raised."""
    scanner = SSEScanner()
    try:
        with engine_errors(decoder, "decode"):
            async with IdleTimeout(idle_timeout) as idle:
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
                if watch is not None:
                    events = watch.feed(events)
                on_first_event()
                await out.start_stream()
                while not scanner.done or (watch is not None and watch.broken is not None):
                    if events:
                        await out.chunk(events)
                    if watch is not None and watch.broken is not None:
                        raise watch.broken
                    data = await read()
                    if not data:
                        break
                    idle.last = decoder.last_progress = now = perf_counter()
                    events = scanner.feed(data, now)
                    if watch is not None and events:
                        events = watch.feed(events)
                if scanner.done:
                    await out.end(events)  # the last events and the end: one write
                    while await read():  # to the end, so the connection is reused
                        idle.last = perf_counter()
        if not scanner.done:
            raise UpstreamError(
                f"decode: decode worker {decoder.url} ended the stream without [DONE]"
            )
    finally:
        _note(timing, scanner)
        stream.close()


def _note(timing: RequestTiming, scanner: SSEScanner) -> None:
    """What the relay saw of the stream, for the request's timing."""
    timing.first_token = scanner.first_token
    timing.last_token = scanner.last_token
    timing.token_events = scanner.token_events
    usage = scanner.usage
    tokens = usage.get("completion_tokens") if usage is not None else None
    timing.output_tokens = tokens if isinstance(tokens, int) else scanner.token_events
