"""``POST /v1/completions`` and ``/v1/chat/completions``: read and validate the request, apply
the injected faults that come before an answer, load remote KV (NIXL pull or LMCache's pushed
chunks), submit one engine sequence per choice, then hand over to ``pdsim.respond``."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from aiohttp import web

from pdsim.engine import Sequence
from pdsim.errors import ApiError
from pdsim.faults import Faults
from pdsim.instance import Instance
from pdsim.nixl import KvLoad, KvLoadFailed, incomplete
from pdsim.records import Record
from pdsim.request import GenRequest, Kind, parse_generation
from pdsim.respond import Responder
from pdsim.web import error_response, read_json

log = logging.getLogger(__name__)

ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


class Generate:
    """The two generation endpoints of one instance."""

    def __init__(self, instance: Instance) -> None:
        self._i = instance
        self._respond = Responder(instance)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        header_id = request.headers.get("X-Request-Id")
        record = self._i.records.add(Record(request.path, header_id))
        faults = self._i.faults.take()
        parsed = await self._parse(request, kind, record, faults)
        if isinstance(parsed, web.StreamResponse):
            return parsed
        req = parsed
        base_id = header_id or secrets.token_hex(8)
        rid = f"chatcmpl-{base_id}" if kind == "chat" else f"cmpl-{base_id}"
        engine_rid = f"{rid if kind == 'chat' else rid + '-0'}-{secrets.token_hex(4)}"
        record.engine_request_id = engine_rid
        kv = (req.kv_params or {}) if self._i.config.kv_transfer else {}
        load = await self._load_kv(req, kv, record)
        if isinstance(load, web.StreamResponse):
            return load
        seqs = self._submit(req, rid, engine_rid, load, bool(kv.get("do_remote_decode")))
        if self._i.lmcache is not None:
            self._i.lmcache.on_submit(seqs[0], kv)
        try:
            if req.stream:
                return await self._respond.stream(request, req, rid, seqs, record, faults)
            return await self._respond.full(req, rid, seqs, record, faults, request)
        finally:
            dropped = record.outcome == "dropped"
            for seq in seqs:
                if not seq.finished:
                    self._i.engine.abort(seq, count=not dropped)
                    if not dropped:
                        record.outcome = "aborted"

    async def _parse(
        self, request: web.Request, kind: Kind, record: Record, faults: Faults | None
    ) -> GenRequest | web.StreamResponse:
        """The validated request, or the answer that ends it here (an error, a fault)."""
        cfg = self._i.config
        body: Any = None
        try:
            body = await read_json(request, cfg.model, record)
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
                return error_response(ApiError(faults.error_message, faults.error_status, err_type))
            return parse_generation(kind, body, cfg.model, cfg.max_model_len, self._i.tokenizer)
        except ApiError as e:
            record.status, record.outcome = e.status, "rejected"
            return error_response(e)
        except asyncio.CancelledError:
            record.outcome = "aborted"
            self._i.metrics.aborted["prefill"] += 1
            # like vLLM: a request aborted before its KV pull tells the producer to free the blocks
            if isinstance(body, dict):
                params = body.get("kv_transfer_params")
                if isinstance(params, dict) and params.get("do_remote_prefill"):
                    self._i.consumer.release_later(params)
            raise

    async def _load_kv(
        self, req: GenRequest, kv: dict[str, Any], record: Record
    ) -> KvLoad | web.StreamResponse:
        """What the prompt's remote KV covers, or the 500 a real decoder answers."""
        load = KvLoad("local")
        if incomplete(kv):
            log.error(
                "kv_transfer_params %s lack remote_block_ids or a remote_* key: a real vLLM 0.32 "
                "decoder's EngineCore dies here and the server exits; the sim answers its 500",
                kv,
            )
            record.status, record.outcome, record.kv = 500, "failed", "failed"
            record.kv_failure = "incomplete_params"
            self._i.metrics.request_success["error"] += 1
            return error_response(ApiError(ENGINE_DEAD, 500, "InternalServerError"))
        if kv.get("do_remote_prefill") and req.prompt_logprobs is not None:
            # like vLLM (skip_reading_prefix_cache): a request for prompt logprobs loads no KV
            # (the prompt's logits were never computed); it recomputes the prompt and tells the
            # producer to free the blocks
            self._i.consumer.release_later(kv)
            record.kv = "skipped"
        elif kv.get("do_remote_prefill"):
            pulled = await self._pull(req, kv, record)
            if isinstance(pulled, web.StreamResponse):
                return pulled
            load = pulled
        lmcache = self._i.lmcache
        if lmcache is not None and (pushed := lmcache.load(req.prompt_ids)) is not None:
            load = pushed
            record.kv, record.kv_failure = load.source, load.failure
        return load

    async def _pull(
        self, req: GenRequest, kv: dict[str, Any], record: Record
    ) -> KvLoad | web.StreamResponse:
        engine = self._i.engine
        engine.pulling += 1
        try:
            load = await self._i.consumer.load(kv, req.prompt_ids)
        except KvLoadFailed as e:
            record.status, record.outcome = 500, "failed"
            record.kv, record.kv_failure = "failed", str(e)
            self._i.metrics.request_success["error"] += 1
            return error_response(ApiError("Internal server error", 500, "InternalServerError"))
        except asyncio.CancelledError:
            record.outcome = "aborted"
            self._i.metrics.aborted["prefill"] += 1
            self._i.consumer.release_later(kv)
            raise
        finally:
            engine.pulling -= 1
        record.kv, record.kv_failure = load.source, load.failure
        return load

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
                    self._i.engine.submit(
                        parent if req.n == 1 else f"{j}_{parent}",  # vLLM's child ids
                        prompt.ids,
                        req.spec(i, j),
                        load.loaded_tokens if i == 0 else 0,
                        produce_kv=produce_kv and not seqs,
                        priority=req.priority,
                    )
                )
        return seqs
