"""One request's legs, carried out: the plan from the planner, the prefill leg through the
connector (with failover), the hand-off, the decode leg (retried on another decoder before any
byte reached the client), and the relay. Nothing is retried after a 4xx: that is the client's
to fix. Every retry asks the planner again (`Planner.retry`); the plan is never completed or
rewritten here.

`Flow` holds what every request's legs share (built once by the app factory); `Legs` is one
request's (or one sub-request's) trip through the engines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from proxy.config import FailoverConfig
from proxy.control.workers import Lease, Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector, Handoff
from proxy.errors import NoWorkerAvailable, ProxyError, UpstreamError, UpstreamTimeout
from proxy.flow.decode import decode_whole, relay_stream
from proxy.flow.gather import Gather, as_stream, gatherable
from proxy.flow.migrate import (
    Transcript,
    cannot_migrate,
    continuation,
    detokenize,
    held_text,
    reason_of,
    unmigratable,
    with_token_ids,
)
from proxy.flow.progress import Progress
from proxy.flow.seam import DONE, Seam, SeamStopped, stop_strings
from proxy.flow.sink import Sink
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import RequestTiming
from proxy.place.plan import Plan
from proxy.place.planner import Planner
from proxy.place.router import Router
from proxy.request import ClientRequest

log = logging.getLogger("pdproxy")

Retryable = (UpstreamError, UpstreamTimeout)


@dataclass
class Flow:
    """What the legs of every request share."""

    planner: Planner
    router: Router
    connector: Connector
    engine: EngineClient
    metrics: ProxyMetrics
    failover: FailoverConfig
    first_byte_timeout: float  # decode: until the decoder's first bytes
    idle_timeout: float  # decode: longest silence of a stream

    def failed(self, worker: Worker, exc: ProxyError) -> None:
        self.router.pool_of(worker).record_failure(worker, exc.message)
        log.info("%s worker %s failed: %s", worker.role, worker.url, exc.message)
        self.metrics.upstream_failures.labels(worker.role, exc.type).inc()


class Legs:
    """One request's trip: `owner` is the client's request task, which a worker's drain ends."""

    def __init__(
        self,
        flow: Flow,
        request: ClientRequest,
        out: Sink,
        timing: RequestTiming,
        progress: Progress,
        owner: asyncio.Task[Any] | None,
        migrations: int | None = None,
        keep_ids: bool | None = None,
    ) -> None:
        self.flow = flow
        self.request = request
        self.out: Sink = out
        self.timing = timing
        self.progress = progress
        self.owner = owner
        self.info = flow.planner.info(request)
        self.prefiller: Worker | None = None  # the one whose prefill leg succeeded
        # migrations left to this answer; a stream that may migrate notes what it relays
        self.migrations = flow.failover.migrations if migrations is None else migrations
        self.transcript: Transcript | None = None
        self.avoid: list[Worker] = []  # a continuation's: the decoder that failed before it
        if self.migrations and gatherable(request):
            # a whole answer that could be continued is read as a stream (proxy.flow.gather)
            self.out = Gather(out, request)
            self.request = request = as_stream(request)
        if self.migrations and unmigratable(request) is None:
            asked = bool(request.body.get("return_token_ids"))
            texts = bool(stop_strings(request.body))
            self.transcript = Transcript(asked if keep_ids is None else keep_ids, texts=texts)

    async def run(self) -> None:
        plan = await self.flow.planner.plan(self.request, self.info)
        self.timing.plan = plan
        await self.carry(plan)

    async def carry(self, plan: Plan) -> None:
        """Carry `plan` out."""
        flow, request, timing = self.flow, self.request, self.timing
        local_tokens = (plan.tokens or 0) if plan.local else 0
        tried: list[Worker] = []
        handoff: Handoff | None = None
        body = b""
        spent = False  # the decode retries are used up
        asked = request if self.transcript is None else with_token_ids(request)
        while True:
            decoder = plan.decoder
            pool = flow.router.pool_of(decoder)
            with pool.track(decoder, request.prompt_chars, local_tokens, self.owner) as lease:
                if handoff is None:
                    handoff = Handoff(None) if plan.local else await self.prefill(plan)
                    body = flow.connector.decode_body(asked, handoff)
                    timing.kv = handoff.outcome
                    # KV now waits on the prefiller for the decoder: a client that leaves before
                    # the first decoded byte closes the decode leg, and the decoder's abort frees
                    # the prefiller's blocks (vLLM; see README "Cancellation")
                    self.progress.phase = "handoff" if handoff.kv_transfer_params else "decode"
                timing.decoder = decoder.id
                lease.decoding()
                try:
                    await self.decode(decoder, body, lease)
                except Retryable as exc:
                    flow.failed(decoder, exc)
                    last = exc
                    spent = len(tried) >= flow.failover.decode_retries
                    if spent and not self.out.started and (request.stream or not self.migrations):
                        raise
                else:
                    pool.record_success(decoder)
                    return
            # the client has part of the answer: continue it elsewhere (a whole answer: again)
            if self.out.started or spent:
                await self.migrate(plan, decoder, last)
                return
            tried.append(decoder)
            if self.prefiller is not None:  # its KV is for another engine than its own
                tried.append(self.prefiller)
            replacement = flow.planner.retry(plan, "decode", self.info, [*self.avoid, *tried])
            if replacement is None:
                raise last
            flow.metrics.retries.labels("decode").inc()
            timing.retries += 1
            log.warning(
                "request %s: decode on %s failed (%s); retrying on %s",
                *(request.request_id, decoder.url, last.message, replacement.decoder.url),
            )
            if handoff.kv_transfer_params is not None and flow.connector.decoder_receivers:
                handoff = self._moved(handoff, decoder, replacement.decoder)
            plan = replacement

    async def migrate(self, plan: Plan, failed: Worker, exc: ProxyError) -> None:
        """The stream broke after the client's first byte: continue it on another decoder
        (proxy.flow.migrate), or raise `exc` (the client's stream ends with its error)."""
        flow, transcript, metrics = self.flow, self.transcript, self.flow.metrics
        if transcript is not None and transcript.finished:  # every token went out already
            usage = transcript.usage_event() if self.request.include_usage else b""
            await self.out.end(usage + DONE)
            return
        whole = not self.request.stream  # nothing reached the client: asked for again
        why = cannot_migrate(self.request, transcript, self.migrations, whole)
        avoid = [failed]  # others that failed before are the breaker's to keep out
        replacement = None if why else flow.planner.migrate(plan, self.info, avoid)
        if replacement is None or (transcript is None and not whole):
            metrics.migrations_failed.labels(why or "no_decoder").inc()
            raise exc
        reason = reason_of(exc)
        metrics.migrations.labels(reason).inc()
        moved = 0 if transcript is None else len(transcript.moved)
        log.warning(
            "request %s: decode on %s failed after %d tokens (%s); continuing on %s",
            *(self.request.request_id, failed.url, moved, exc.message, replacement.decoder.url),
        )
        request, out = self.request, self.out
        if transcript is not None:
            tag = f"m{flow.failover.migrations - self.migrations + 1}"
            request = continuation(self.request, transcript, tag)
            out = await self._seam(replacement.decoder, transcript)
        timing = RequestTiming(perf_counter(), path=request.path, request_id=request.request_id)
        timing.plan = replacement
        # the continuation's ids stay in its events: the seam counts them, and hides them
        legs = Legs(flow, request, out, timing, self.progress, self.owner, self.migrations - 1,
                    keep_ids=True)  # fmt: skip
        legs.avoid = avoid
        try:
            await legs.carry(replacement)
        except SeamStopped:
            pass  # the answer ended at a stop string across the seam
        except ProxyError:
            metrics.migrations_failed.labels("continuation_failed").inc()
            raise
        finally:
            self.timing.seam(failed.id, reason, moved, timing)

    async def _seam(self, decoder: Worker, transcript: Transcript) -> Seam:
        """Where the continuation on `decoder` joins the client's stream."""
        if not transcript.texts:
            return Seam(self.out, self.request, transcript)
        flow = self.flow  # the seam checks the stop strings across it
        measure = functools.partial(
            detokenize, flow.engine, decoder, self.request, timeout=flow.first_byte_timeout
        )
        held = await held_text(measure, transcript)
        return Seam(self.out, self.request, transcript, held, measure)

    async def prefill(self, plan: Plan) -> Handoff:
        """The prefill leg on the planned prefiller, then on the planner's replacements if it
        fails; with none left, a decoder-local prefill when allowed (counted as a fallback)."""
        flow, request, timing = self.flow, self.request, self.timing
        tried: list[Worker] = [plan.decoder]  # a pool engine never prefills for itself
        last: ProxyError | None = None
        timing.prefill_start = perf_counter()
        for attempt in range(flow.failover.prefill_retries + 1):
            if attempt:
                retry = flow.planner.retry(plan, "prefill", self.info, tried)
                if retry is None:
                    break
                plan = retry
                flow.metrics.retries.labels("prefill").inc()
                timing.retries += 1
            prefiller = plan.prefiller
            if prefiller is None:
                break
            timing.prefiller = prefiller.id
            if attempt:
                log.warning(
                    "request %s: retrying prefill on %s after: %s",
                    *(request.request_id, prefiller.url, last.message if last else ""),
                )
            chars = request.prompt_chars
            pool = flow.router.pool_of(prefiller)
            with pool.track(prefiller, chars, plan.tokens or 0, self.owner) as lease:
                try:
                    async with lease.wait():
                        handoff = await flow.connector.prefill(request, prefiller, plan.decoder)
                except Retryable as exc:
                    flow.failed(prefiller, exc)
                    tried.append(prefiller)
                    last = exc
                    continue
            pool.record_success(prefiller)
            self.prefiller = prefiller
            timing.prefill_end = perf_counter()
            self._note_recompute(handoff, plan.decoder)
            return handoff
        return self._fallback(plan.decoder, last)

    def _moved(self, handoff: Handoff, failed: Worker, decoder: Worker) -> Handoff:
        """The KV was pushed into the decoder that failed: the next one computes the prompt
        again, and that is never silent."""
        moved = Handoff(
            None,
            f"the KV was pushed into decoder {failed.url}, which failed before its first byte",
            "decoder_retry",
        )
        self.timing.kv = moved.outcome
        self._note_recompute(moved, decoder)
        return moved

    def _note_recompute(self, handoff: Handoff, decoder: Worker) -> None:
        if handoff.recompute_reason is not None:
            self.flow.metrics.recompute.labels(handoff.recompute_kind).inc()
            log.warning(
                "request %s: KV not handed over, decoder %s will recompute the prompt: %s",
                *(self.request.request_id, decoder.url, handoff.recompute_reason),
            )

    def _fallback(self, decoder: Worker, last: ProxyError | None) -> Handoff:
        """No prefiller could: the decoder computes the prompt, where the config allows it."""
        if not self.flow.failover.fallback_local_prefill:
            raise last or NoWorkerAvailable("no prefill worker is available")
        reason = "prefill_failed" if last else "no_prefiller"
        why = last.message if last else "no prefill worker is available"
        self.flow.metrics.fallbacks.labels(reason).inc()
        log.warning(
            "request %s: falling back to prefill on decoder %s: %s",
            *(self.request.request_id, decoder.url, why),
        )
        self.timing.prefill_start = None
        return Handoff(None, why, reason)

    async def decode(self, decoder: Worker, body: bytes, lease: Lease) -> None:
        flow, request = self.flow, self.request
        if not request.stream:
            await decode_whole(
                flow.engine, request, decoder, body, self.out, self.timing, flow.first_byte_timeout
            )
            return
        async with lease.wait():
            stream, data = await flow.engine.open_stream(
                decoder, request.path, body, request.request_id, flow.first_byte_timeout
            )

        def first_event() -> None:
            self.progress.phase = "decode"
            lease.prefilled()

        await relay_stream(
            stream, data, decoder, self.out, self.timing, flow.idle_timeout, first_event,
            self.transcript,
        )  # fmt: skip
