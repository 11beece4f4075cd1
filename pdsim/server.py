"""The simulated vLLM server: OpenAI-compatible HTTP on the main port, KV side channel on its own.

``start_sim(config)`` builds and starts one instance in the running event loop and returns a
``SimServer``; ``await server.close()`` stops it. Every instance serves both NIXL roles, like
a vLLM ``kv_both`` engine: ``do_remote_decode`` makes it a producer, ``do_remote_prefill`` a
consumer, whatever its ``role`` label says.

Faithful to vLLM 0.32 as observed (tests/e2e/REAL_VLLM_FACTS.md; tests/protocol runs the same
assertions against both): no ``X-Request-Id`` response header unless ``request_id_headers``;
POST bodies must be ``application/json``; unknown paths answer FastAPI's ``{"detail": ...}``;
lists of prompts and ``n`` give choices i * n + j with usage counting each prompt once; ``seed``
gives sample j the seed ``seed + j``; ``echo``, ``logprobs`` and ``prompt_logprobs`` (a request
for them loads no remote KV: it recomputes the prompt and frees the producer's blocks);
``priority`` is accepted, and orders the waiting queue with ``scheduling_policy="priority"``.
Deliberately different: incomplete ``do_remote_prefill`` params answer 500 like the real
decoder but the sim stays up (the real one exits); a failed pull fails at once rather than
after vLLM's ~5 s; a read of KV blocks reused since their lease ended fails (NIXL would hand
over another request's KV silently); ``return_token_ids`` fills full responses only; without
a seed every sample is the greedy one; remote KV in a request with several prompts or n > 1
is loaded once, for the first prompt; empty text chunks of a plain stream are skipped;
``/version`` says ``0.32.0+pdsim``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pdsim.config import BLOCK_SIZE, SimConfig
from pdsim.control import Record, Records, add_control_routes
from pdsim.engine import Engine, Sequence
from pdsim.faults import Faults, FaultState
from pdsim.kvcache import num_blocks_for
from pdsim.lmcache import LMCacheMode
from pdsim.metrics import Metrics
from pdsim.model import Step
from pdsim.nixl import KvLoad, KvLoadFailed, NixlConsumer, incomplete, producer_params
from pdsim.protocol import (
    DONE,
    ApiError,
    Choice,
    ChunkWriter,
    GenRequest,
    Kind,
    field_error,
    full_response,
    model_not_found,
    not_an_object,
    parse_generation,
    schema_error,
    stream_usage,
)
from pdsim.render import ChoiceView, PromptView
from pdsim.sidechannel import side_channel_app
from pdsim.tokenizer import SimTokenizer

log = logging.getLogger(__name__)

SIM_VERSION = "0.32.0+pdsim"
ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type="application/json")


@web.middleware
async def _fastapi_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths and methods answer like FastAPI: ``{"detail": "Not Found"}``."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
        return _json({"detail": e.reason}, e.status)


def _json_error(raw: bytes) -> ApiError:
    """Invalid JSON as vLLM reports it: pydantic's json_invalid at the byte offset."""
    try:
        json.loads(raw)
        reason, pos = "Invalid JSON", 0
    except json.JSONDecodeError as e:
        reason, pos = e.msg, e.pos
    except UnicodeDecodeError as e:
        reason, pos = str(e.reason), e.start
    err = field_error("json_invalid", str(pos), "JSON decode error", {})
    err["ctx"] = {"error": reason}
    return schema_error([err])


class SimServer:
    """One running instance; build it with ``start_sim``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine_id = config.engine_id or str(uuid.uuid4())
        self.tokenizer = SimTokenizer()
        self.metrics = Metrics()
        self.records = Records(config.max_records)
        self.faults = FaultState(config.faults)
        self.system_fingerprint = f"vllm-{SIM_VERSION}-{secrets.token_hex(4)}"
        self.port = 0
        self.side_channel_port = 0
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._engine: Engine | None = None
        self._consumer: NixlConsumer | None = None
        self.lmcache: LMCacheMode | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "SimServer is not started"
        return self._engine

    def __repr__(self) -> str:
        return (
            f"SimServer(role={self.config.role}, url={self.url}, "
            f"side_channel_port={self.side_channel_port}, engine_id={self.engine_id})"
        )

    async def start(self) -> None:
        cfg = self.config
        self._engine = Engine(cfg, self.tokenizer, self.metrics, self._producer_params)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._consumer = NixlConsumer(
            self._session,
            cfg.timing,
            self.metrics,
            cfg.kv_load_failure_policy == "fail",
            lambda: self.faults.current.kv_xfer_gbps,
        )
        if cfg.lmcache is not None:
            self.lmcache = LMCacheMode(cfg.lmcache, cfg.timing, self.metrics)
            await self.lmcache.start()
        side = side_channel_app(
            self.engine_id, self._engine.pool, lambda: self.faults.current.side_channel_error
        )
        self.side_channel_port = await self._serve(side, cfg.side_channel_port)
        self.port = await self._serve(self._build_app(), cfg.port)
        log.info("%r started", self)

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop serving and free everything; safe to call twice."""
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        if self._engine is not None:
            await self._engine.close()
        if self.lmcache is not None:
            await self.lmcache.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- app -------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_fastapi_http_errors])
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_get("/v1/models", self._models)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/detokenize", self._detokenize)
        r.add_get("/health", self._health)
        r.add_get("/version", self._version)
        r.add_get("/metrics", self._metrics)
        add_control_routes(app, self.records, self.faults, self._info)
        if self.lmcache is not None:
            self.lmcache.add_routes(app)
        if self.config.request_id_headers:
            app.on_response_prepare.append(self._echo_request_id)
        return app

    @staticmethod
    async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
        """vLLM's --enable-request-id-headers: the client's id, else a fresh uuid (not the one
        in the body's ``id``)."""
        response.headers["X-Request-Id"] = request.headers.get("X-Request-Id", uuid.uuid4().hex)

    def _info(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "role": self.config.role,
            "model": self.config.model,
            "engine_id": self.engine_id,
            "port": self.port,
            "side_channel_port": self.side_channel_port,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "held_kv_blocks": engine.pool.held_blocks,
            "leased_requests": engine.pool.leased_requests,
            "used_kv_blocks": engine.pool.used_blocks,
            "faults": self.faults.current.model_dump(),
            "timing": dataclasses.asdict(self.config.timing),
        }

    def _producer_params(self, seq: Sequence, num_tokens: int) -> dict[str, Any]:
        return producer_params(
            engine_id=self.engine_id,
            host=self.config.side_channel_host,
            port=self.side_channel_port,
            request_id=seq.request_id,
            block_ids=seq.block_ids[: num_blocks_for(num_tokens)],
            num_tokens=num_tokens,
            single_step=len(seq.gen.token_ids) == 1,
        )

    # -- simple endpoints --------------------------------------------------------------------

    async def _models(self, _: web.Request) -> web.Response:
        card = {
            "id": self.config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{secrets.token_hex(8)}",
                    "object": "model_permission",
                    "created": int(time.time()),
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return _json({"object": "list", "data": [card]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.current.unhealthy else 200)

    async def _version(self, _: web.Request) -> web.Response:
        return _json({"version": SIM_VERSION})

    async def _metrics(self, _: web.Request) -> web.Response:
        engine = self.engine
        self.metrics.kv_expired_reqs = engine.pool.expired_requests
        text = self.metrics.render(
            self.config.model,
            engine.num_running,
            engine.num_waiting,
            engine.pool.usage,
            engine.pool.held_blocks,
            engine.pulling,
            {
                "block_size": str(BLOCK_SIZE),
                "enable_prefix_caching": str(self.config.prefix_caching),
                "num_gpu_blocks": str(self.config.num_gpu_blocks),
            },
        )
        if self.lmcache is not None:
            text += self.lmcache.render()
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _read_json(self, request: web.Request, record: Record | None = None) -> Any:
        raw = await request.read()
        if request.content_type != "application/json":
            if record is not None:
                record.body = raw.decode("utf-8", "replace")
            raise ApiError(
                "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                400,
                "Bad Request",
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            if record is not None:
                record.body = raw.decode("utf-8", "replace")
            raise _json_error(raw) from e
        if record is not None:
            record.body = body
        if not isinstance(body, dict):
            raise not_an_object(body)
        requested = body.get("model")
        if requested is not None and requested != self.config.model:
            raise model_not_found(requested, self.config.model)
        return body

    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            if "messages" in body:
                text = self.tokenizer.apply_chat_template(
                    body["messages"], bool(body.get("add_generation_prompt", True))
                )
                ids = self.tokenizer.encode(text)
            elif isinstance(body.get("prompt"), str):
                ids = self.tokenizer.encode(
                    body["prompt"], bool(body.get("add_special_tokens", True))
                )
            else:
                raise schema_error(
                    [
                        field_error("missing", "prompt", "Field required", body),
                        field_error("missing", "messages", "Field required", body),
                    ]
                )
        except (ApiError, ValueError, TypeError) as e:
            return _error(e if isinstance(e, ApiError) else ApiError(str(e)))
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self.config.max_model_len,
            "tokens": ids,
            "token_strs": self.tokenizer.token_strs(ids) if body.get("return_token_strs") else None,
        }
        return _json(out)

    async def _detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read_json(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and t >= 0 for t in tokens
            ):
                raise ApiError("tokens must be a list of non-negative integers.", param="tokens")
        except ApiError as e:
            return _error(e)
        return _json({"prompt": self.tokenizer.decode(tokens)})

    # -- generation -------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        header_id = request.headers.get("X-Request-Id")
        base_id = header_id or secrets.token_hex(8)
        record = self.records.add(Record(request.path, header_id))
        faults = self.faults.take()
        body: Any = None
        try:
            body = await self._read_json(request, record)
            if (
                faults is not None
                and faults.stall_seconds > 0
                and faults.stall_after_chunks is None
            ):
                await asyncio.sleep(faults.stall_seconds)
            if faults is not None and faults.error_status is not None:
                record.status, record.outcome = faults.error_status, "fault"
                err_type = (
                    "InternalServerError" if faults.error_status >= 500 else "BadRequestError"
                )
                return _error(ApiError(faults.error_message, faults.error_status, err_type))
            req = parse_generation(
                kind, body, self.config.model, self.config.max_model_len, self.tokenizer
            )
        except ApiError as e:
            record.status, record.outcome = e.status, "rejected"
            return _error(e)
        except asyncio.CancelledError:
            record.outcome = "aborted"
            self.metrics.aborted["prefill"] += 1
            # like vLLM: a request aborted before its KV pull tells the producer to free the blocks
            if self._consumer is not None and isinstance(body, dict):
                params = body.get("kv_transfer_params")
                if isinstance(params, dict) and params.get("do_remote_prefill"):
                    self._consumer.release_later(params)
            raise
        rid = f"chatcmpl-{base_id}" if kind == "chat" else f"cmpl-{base_id}"
        engine_rid = f"{rid if kind == 'chat' else rid + '-0'}-{secrets.token_hex(4)}"
        record.engine_request_id = engine_rid
        kv = (req.kv_params or {}) if self.config.kv_transfer else {}

        load = KvLoad("local")
        if incomplete(kv):
            log.error(
                "kv_transfer_params %s lack remote_block_ids or a remote_* key: a real vLLM 0.32 "
                "decoder's EngineCore dies here and the server exits; the sim answers its 500",
                kv,
            )
            record.status, record.outcome, record.kv = 500, "failed", "failed"
            record.kv_failure = "incomplete_params"
            self.metrics.request_success["error"] += 1
            return _error(ApiError(ENGINE_DEAD, 500, "InternalServerError"))
        if kv.get("do_remote_prefill") and req.prompt_logprobs is not None:
            # like vLLM (skip_reading_prefix_cache): a request for prompt logprobs loads no KV
            # (the prompt's logits were never computed); it recomputes the prompt and tells the
            # producer to free the blocks
            assert self._consumer is not None
            self._consumer.release_later(kv)
            record.kv = "skipped"
        elif kv.get("do_remote_prefill"):
            assert self._consumer is not None
            self.engine.pulling += 1
            try:
                load = await self._consumer.load(kv, req.prompt_ids)
            except KvLoadFailed as e:
                record.status, record.outcome = 500, "failed"
                record.kv, record.kv_failure = "failed", str(e)
                self.metrics.request_success["error"] += 1
                return _error(ApiError("Internal server error", 500, "InternalServerError"))
            except asyncio.CancelledError:
                record.outcome = "aborted"
                self.metrics.aborted["prefill"] += 1
                self._consumer.release_later(kv)
                raise
            finally:
                self.engine.pulling -= 1
            record.kv, record.kv_failure = load.source, load.failure

        if self.lmcache is not None and (pushed := self.lmcache.load(req.prompt_ids)) is not None:
            load = pushed
            record.kv, record.kv_failure = load.source, load.failure

        seqs = self._submit(req, rid, engine_rid, load, bool(kv.get("do_remote_decode")))
        if self.lmcache is not None:
            self.lmcache.on_submit(seqs[0], kv)
        try:
            if req.stream:
                return await self._stream(request, req, rid, seqs, record, faults)
            return await self._full(req, rid, seqs, record, faults, request)
        finally:
            dropped = record.outcome == "dropped"
            for seq in seqs:
                if not seq.finished:
                    self.engine.abort(seq, count=not dropped)
                    if not dropped:
                        record.outcome = "aborted"

    def _submit(
        self, req: GenRequest, rid: str, engine_rid: str, load: KvLoad, produce_kv: bool
    ) -> list[Sequence]:
        """One sequence per choice: prompt i, sample j. Loaded KV is the first prompt's; only
        the first choice offers its KV (the proxy sends one prompt and n=1 to a prefiller)."""
        seqs: list[Sequence] = []
        for i, prompt in enumerate(req.prompts):
            parent = engine_rid if i == 0 else f"{rid}-{i}-{secrets.token_hex(4)}"
            for j in range(req.n):
                seqs.append(
                    self.engine.submit(
                        parent if req.n == 1 else f"{j}_{parent}",  # vLLM's child ids
                        prompt.ids,
                        req.spec(i, j),
                        load.loaded_tokens if i == 0 else 0,
                        produce_kv=produce_kv and not seqs,
                        priority=req.priority,
                    )
                )
        return seqs

    async def _until_final(self, seq: Sequence) -> list[Step]:
        steps: list[Step] = []
        while not steps or steps[-1].finish_reason is None:
            more = await self.engine.next_steps(seq)
            if not more:
                raise asyncio.CancelledError  # aborted under us
            steps += more
        return steps

    async def _full(
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
        if self.lmcache is not None:
            self.lmcache.on_finished(seqs[0])
        prompts = [PromptView(req, p, self.tokenizer) for p in req.prompts]
        ids = req.return_token_ids
        choices = []
        for k, (seq, steps) in enumerate(zip(seqs, results, strict=True)):
            prompt = prompts[k // req.n]
            text, logprobs = ChoiceView(req, self.tokenizer, k, prompt).piece(steps)
            completion = req.kind == "completion"
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
        body = full_response(
            req.kind,
            rid,
            int(time.time()),
            self.config.model,
            choices,
            sum(len(p.ids) for p in req.prompts),
            sum(len(s.gen.token_ids) for s in seqs),
            seqs[0].kv_transfer_params,
            self.system_fingerprint,
            (req.prompt_ids if ids else None, prompts[0].body),
        )
        self._finish_record(record, results[0][-1], seqs[0])
        if faults is not None and (faults.garbage_body or faults.truncate_body):
            return await self._bad_body(request, body, faults, record)
        return web.Response(body=body, content_type="application/json")

    async def _bad_body(
        self, request: web.Request, body: bytes, faults: Faults, record: Record
    ) -> web.StreamResponse:
        if faults.garbage_body:
            return web.Response(
                body=b'{"id": "garbage", <<< not json', content_type="application/json"
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        record.outcome = "dropped"
        self._drop(request)
        return resp

    @staticmethod
    def _drop(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _finish_record(self, record: Record, final: Step, seq: Sequence) -> None:
        record.status = 200
        record.outcome = "completed"
        record.finish_reason = final.finish_reason
        record.kv_transfer_params_returned = seq.kv_transfer_params is not None

    async def _steps(self, seqs: list[Sequence]) -> AsyncGenerator[tuple[int, list[Step]]]:
        """(choice, steps) as the sequences produce them, until every one has finished;
        stops early when one was aborted."""
        if len(seqs) == 1:
            while True:
                steps = await self.engine.next_steps(seqs[0])
                if not steps:
                    return
                yield 0, steps
                if steps[-1].finish_reason is not None:
                    return
        queue: asyncio.Queue[tuple[int, list[Step]]] = asyncio.Queue()

        async def pump(k: int, seq: Sequence) -> None:
            while True:
                steps = await self.engine.next_steps(seq)
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

    async def _stream(
        self,
        request: web.Request,
        req: GenRequest,
        rid: str,
        seqs: list[Sequence],
        record: Record,
        faults: Faults | None,
    ) -> web.StreamResponse:
        kind = req.kind
        writer = ChunkWriter(
            kind, rid, int(time.time()), self.config.model, self.system_fingerprint,
            req.include_usage,
        )  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        record.status = 200
        drop_after = faults.drop_after_chunks if faults else None
        error_after = faults.error_event_after_chunks if faults else None
        stall_after = faults.stall_after_chunks if faults else None
        sent = 0

        async def send(event: bytes) -> bool:
            """Write one event; False when a fault ended the stream."""
            nonlocal sent
            if faults is not None and stall_after is not None and sent == stall_after:
                await asyncio.sleep(faults.stall_seconds)
            if drop_after is not None and sent >= drop_after:
                record.outcome = "dropped"
                self._drop(request)
                return False
            if error_after is not None and sent >= error_after:
                code = faults.error_status if faults and faults.error_status else 500
                msg = faults.error_message if faults else "Injected fault"
                await resp.write(ChunkWriter.error(msg, "InternalServerError", code) + DONE)
                record.outcome = "dropped"
                return False
            await resp.write(event)
            sent += 1
            return True

        if faults is not None and (faults.garbage_body or faults.truncate_body):
            record.outcome = "dropped"
            if faults.garbage_body:
                await resp.write(b"data: {not json at all\n\n" + DONE)
            else:
                await resp.write(writer.delta("partial")[:25])
                self._drop(request)
            return resp
        prompts = [PromptView(req, p, self.tokenizer) for p in req.prompts]
        views = [ChoiceView(req, self.tokenizer, k, prompts[k // req.n]) for k in range(len(seqs))]
        plain = len(seqs) == 1 and req.logprobs is None and req.echo is None
        plain = plain and not req.continuous_usage

        def usage_of(k: int) -> dict[str, int] | None:
            if not req.continuous_usage:
                return None
            return stream_usage(len(prompts[k // req.n].prompt.ids), views[k].tokens)

        if kind == "chat":
            for k in range(len(seqs)):
                if not await send(writer.role(k, usage_of(k))):
                    return resp
            if req.echo:  # vLLM: the echoed last message as a chunk of its own per choice
                for k, view in enumerate(views):
                    view.echo_pending = False
                    if not await send(writer.event(k, req.echo, usage=usage_of(k))):
                        return resp
        finals: list[Step | None] = [None] * len(seqs)
        coalesce = self.config.timing.enabled
        async with contextlib.aclosing(self._steps(seqs)) as produced:
            async for k, steps in produced:
                # Like vLLM's output handler, the steps produced while the client lagged go
                # out as one chunk (a chunk may carry several tokens). Untimed, every token is
                # ready at once: one chunk per token then, so chunk-counting faults stay
                # meaningful.
                for group in [steps] if coalesce else [[step] for step in steps]:
                    event = self._chunk(writer, req, views[k], group, plain, usage_of)
                    if group[-1].finish_reason is not None:
                        finals[k] = group[-1]
                    if event and not await send(event):
                        return resp
        if any(final is None for final in finals):
            return resp  # aborted
        if req.include_usage and not await send(
            writer.usage(
                sum(len(p.ids) for p in req.prompts), sum(len(s.gen.token_ids) for s in seqs)
            )
        ):
            return resp
        await resp.write(DONE)
        first = finals[0]
        assert first is not None
        self._finish_record(record, first, seqs[0])
        await resp.write_eof()
        return resp

    @staticmethod
    def _chunk(
        writer: ChunkWriter,
        req: GenRequest,
        view: ChoiceView,
        group: list[Step],
        plain: bool,
        usage_of: Callable[[int], dict[str, int] | None],
    ) -> bytes:
        """The event for `group` of choice `view` (b"" when it carries nothing)."""
        final = group[-1] if group[-1].finish_reason is not None else None
        if plain:
            text = "".join(step.text for step in group)
            if final is not None:
                return writer.final(dataclasses.replace(final, text=text))
            return writer.delta(text) if text else b""
        echo = view.echo_pending and req.kind == "completion"
        text, logprobs = view.piece(group)
        if final is None and not text and logprobs is None:
            return b""
        prompt_ids = view.prompt.prompt.ids if echo else None
        usage = usage_of(view.index)
        return writer.event(view.index, text, final, logprobs, prompt_ids, usage)


async def start_sim(config: SimConfig | None = None) -> SimServer:
    """Start one simulated vLLM instance in the running loop (``port=0`` picks a free port)."""
    server = SimServer(config or SimConfig())
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    return server


async def serve_forever(server: SimServer, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then close."""
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.close()
