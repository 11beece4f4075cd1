"""Answers to a generation request: the full JSON body, or the SSE stream with its mid-stream
faults (stall, drop, error event, death of the engine, garbage, truncation)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncGenerator, Callable

from aiohttp import web

from pdsim.engine import Sequence
from pdsim.faults import Faults
from pdsim.instance import Instance
from pdsim.model import Step
from pdsim.records import Record
from pdsim.render import ChoiceView, PromptView
from pdsim.request import GenRequest
from pdsim.response import DONE, Choice, ChunkWriter, full_response, stream_usage
from pdsim.web import drop

log = logging.getLogger(__name__)

UsageOf = Callable[[int], dict[str, int] | None]


class Responder:
    """Turns a request's finished or streaming sequences into its answer."""

    def __init__(self, instance: Instance) -> None:
        self._i = instance

    async def full(
        self,
        req: GenRequest,
        rid: str,
        seqs: list[Sequence],
        record: Record,
        faults: Faults | None,
        request: web.Request,
    ) -> web.StreamResponse:
        if len(seqs) == 1:
            results = [await self._until_final(seqs[0])]
        else:
            results = await asyncio.gather(*(self._until_final(s) for s in seqs))
        if self._i.lmcache is not None:
            self._i.lmcache.on_finished(seqs[0])
        body = self._full_body(req, rid, seqs, results)
        _finish_record(record, results[0][-1], seqs[0])
        if faults is not None and (faults.garbage_body or faults.truncate_body):
            return await _bad_body(request, body, faults, record)
        return web.Response(body=body, content_type="application/json")

    def _full_body(
        self, req: GenRequest, rid: str, seqs: list[Sequence], results: list[list[Step]]
    ) -> bytes:
        tok = self._i.tokenizer
        prompts = [PromptView(req, p, tok) for p in req.prompts]
        ids = req.return_token_ids
        completion = req.kind == "completion"
        choices = []
        for k, (seq, steps) in enumerate(zip(seqs, results, strict=True)):
            prompt = prompts[k // req.n]
            text, logprobs = ChoiceView(req, tok, k, prompt).piece(steps)
            choices.append(
                Choice(
                    k,
                    text,
                    steps[-1],
                    list(seq.gen.token_ids) if ids else None,
                    logprobs,
                    prompt.body if completion else None,
                    seq.prompt_ids if ids and completion else None,
                )
            )
        return full_response(
            req.kind,
            rid,
            int(time.time()),
            self._i.config.model,
            choices,
            sum(len(p.ids) for p in req.prompts),
            sum(len(s.gen.token_ids) for s in seqs),
            seqs[0].kv_transfer_params,
            self._i.system_fingerprint,
            (req.prompt_ids if ids else None, prompts[0].body),
        )

    async def _until_final(self, seq: Sequence) -> list[Step]:
        steps: list[Step] = []
        while not steps or steps[-1].finish_reason is None:
            more = await self._i.engine.next_steps(seq)
            if not more:
                raise asyncio.CancelledError  # aborted under us
            steps += more
        return steps

    async def stream(
        self,
        request: web.Request,
        req: GenRequest,
        rid: str,
        seqs: list[Sequence],
        record: Record,
        faults: Faults | None,
    ) -> web.StreamResponse:
        cfg = self._i.config
        writer = ChunkWriter(
            req.kind, rid, int(time.time()), cfg.model, self._i.system_fingerprint,
            req.include_usage,
        )  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        record.status = 200
        if faults is not None and (faults.garbage_body or faults.truncate_body):
            record.outcome = "dropped"
            if faults.garbage_body:
                await resp.write(b"data: {not json at all\n\n" + DONE)
            else:
                await resp.write(writer.delta("partial")[:25])
                drop(request)
            return resp
        sink = _EventSink(request, resp, record, faults)
        finals = await self._relay(sink, writer, req, seqs)
        if finals is None:
            return resp
        if req.include_usage and not await sink.send(
            writer.usage(
                sum(len(p.ids) for p in req.prompts), sum(len(s.gen.token_ids) for s in seqs)
            )
        ):
            return resp
        await resp.write(DONE)
        _finish_record(record, finals[0], seqs[0])
        await resp.write_eof()
        return resp

    async def _relay(
        self, sink: _EventSink, writer: ChunkWriter, req: GenRequest, seqs: list[Sequence]
    ) -> list[Step] | None:
        """Send the stream's events; the final step of each choice, None when the stream ended
        early (a fault, an abort)."""
        tok = self._i.tokenizer
        prompts = [PromptView(req, p, tok) for p in req.prompts]
        views = [ChoiceView(req, tok, k, prompts[k // req.n]) for k in range(len(seqs))]
        plain = len(seqs) == 1 and req.logprobs is None and req.echo is None
        plain = plain and not req.return_token_ids
        plain = plain and not req.continuous_usage

        def usage_of(k: int) -> dict[str, int] | None:
            if not req.continuous_usage:
                return None
            return stream_usage(len(prompts[k // req.n].prompt.ids), views[k].tokens)

        if req.kind == "chat" and not await _chat_head(sink, writer, req, views, usage_of):
            return None
        finals: list[Step | None] = [None] * len(seqs)
        coalesce = self._i.config.timing.enabled
        async with contextlib.aclosing(self._steps(seqs)) as produced:
            async for k, steps in produced:
                # Like vLLM's output handler, the steps produced while the client lagged go
                # out as one chunk (a chunk may carry several tokens). Untimed, every token is
                # ready at once: one chunk per token then, so chunk-counting faults stay
                # meaningful.
                for group in [steps] if coalesce else [[step] for step in steps]:
                    event = _chunk(writer, req, views[k], group, plain, usage_of)
                    if group[-1].finish_reason is not None:
                        finals[k] = group[-1]
                    if event and not await sink.send(event):
                        return None
        done = [final for final in finals if final is not None]
        return done if len(done) == len(finals) else None  # else aborted

    async def _steps(self, seqs: list[Sequence]) -> AsyncGenerator[tuple[int, list[Step]]]:
        """(choice, steps) as the sequences produce them, until every one has finished;
        stops early when one was aborted."""
        engine = self._i.engine
        if len(seqs) == 1:
            while True:
                steps = await engine.next_steps(seqs[0])
                if not steps:
                    return
                yield 0, steps
                if steps[-1].finish_reason is not None:
                    return
        queue: asyncio.Queue[tuple[int, list[Step]]] = asyncio.Queue()

        async def pump(k: int, seq: Sequence) -> None:
            while True:
                steps = await engine.next_steps(seq)
                queue.put_nowait((k, steps))
                if not steps or steps[-1].finish_reason is not None:
                    return

        tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(seqs)]
        try:
            left = len(seqs)
            while left:
                k, steps = await queue.get()
                if not steps:
                    return
                left -= steps[-1].finish_reason is not None
                yield k, steps
        finally:
            for task in tasks:
                task.cancel()


class _EventSink:
    """Writes a stream's events, applying the faults that strike after some chunks."""

    def __init__(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        record: Record,
        faults: Faults | None,
    ) -> None:
        self._request = request
        self._resp = resp
        self._record = record
        self._faults = faults
        self.sent = 0

    async def send(self, event: bytes) -> bool:
        """Write one event; False when a fault ended the stream."""
        f = self._faults
        if f is not None and f.stall_after_chunks is not None and self.sent == f.stall_after_chunks:
            await asyncio.sleep(f.stall_seconds)
        if f is not None and f.exit_after_chunks is not None and self.sent >= f.exit_after_chunks:
            log.warning("fault exit_after_chunks: the engine dies now")
            os.kill(os.getpid(), signal.SIGKILL)  # as a decoder killed mid-answer: no goodbye
        if f is not None and f.drop_after_chunks is not None and self.sent >= f.drop_after_chunks:
            self._record.outcome = "dropped"
            drop(self._request)
            return False
        if (
            f is not None
            and f.error_event_after_chunks is not None
            and self.sent >= f.error_event_after_chunks
        ):
            code = f.error_status or 500
            error = ChunkWriter.error(f.error_message, "InternalServerError", code)
            await self._resp.write(error + DONE)
            self._record.outcome = "dropped"
            return False
        await self._resp.write(event)
        self.sent += 1
        return True


async def _chat_head(
    sink: _EventSink,
    writer: ChunkWriter,
    req: GenRequest,
    views: list[ChoiceView],
    usage_of: UsageOf,
) -> bool:
    """A chat stream's opening: a role chunk per choice, then (with echo) the echoed last
    message as a chunk of its own per choice, as vLLM sends them."""
    for k in range(len(views)):
        prompt_ids = views[k].prompt.prompt.ids if req.return_token_ids else None
        if not await sink.send(writer.role(k, usage_of(k), prompt_ids)):
            return False
    if req.echo:
        for k, view in enumerate(views):
            view.echo_pending = False
            if not await sink.send(writer.event(k, req.echo, usage=usage_of(k))):
                return False
    return True


def _chunk(
    writer: ChunkWriter,
    req: GenRequest,
    view: ChoiceView,
    group: list[Step],
    plain: bool,
    usage_of: UsageOf,
) -> bytes:
    """The event for `group` of choice `view` (b"" when it carries nothing)."""
    final = group[-1] if group[-1].finish_reason is not None else None
    if plain:
        text = "".join(step.text for step in group)
        if final is not None:
            return writer.final(dataclasses.replace(final, text=text))
        return writer.delta(text) if text else b""
    ids = [step.token_id for step in group] if req.return_token_ids else None
    # completions: the prompt's ids go in the choice's first chunk (echoed, or asked for)
    first = (view.echo_pending or not view.tokens) and req.kind == "completion"
    echo_or_ids = first and (view.echo_pending or ids is not None)
    text, logprobs = view.piece(group)
    if final is None and not text and logprobs is None and not ids:
        return b""  # vLLM sends a chunk without text only to carry token ids or logprobs
    prompt_ids = view.prompt.prompt.ids if echo_or_ids else None
    usage = usage_of(view.index)
    return writer.event(view.index, text, final, logprobs, prompt_ids, usage, ids)


def _finish_record(record: Record, final: Step, seq: Sequence) -> None:
    record.status = 200
    record.outcome = "completed"
    record.finish_reason = final.finish_reason
    record.kv_transfer_params_returned = seq.kv_transfer_params is not None


async def _bad_body(
    request: web.Request, body: bytes, faults: Faults, record: Record
) -> web.StreamResponse:
    if faults.garbage_body:
        return web.Response(body=b'{"id": "garbage", <<< not json', content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    record.outcome = "dropped"
    drop(request)
    return resp
