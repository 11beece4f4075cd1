"""The simulated vLLM server: OpenAI-compatible HTTP on the main port, KV side channel on its own.

``start_sim(config)`` builds and starts one instance in the running event loop and returns a
``SimServer``; ``await server.close()`` stops it. Every instance serves both NIXL roles, like
a vLLM ``kv_both`` engine: ``do_remote_decode`` makes it a producer, ``do_remote_prefill`` a
consumer, whatever its ``role`` label says. The routes live by concern: ``pdsim.generate`` and
``pdsim.respond`` (generation), ``pdsim.endpoints`` (models, tokenize, health, version,
metrics), ``pdsim.control`` (the ``/_sim/`` test controls), ``pdsim.lmcache`` (LMCache PD).

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
over another request's KV silently); without a seed every sample is the greedy one; remote KV
in a request with several prompts or n > 1 is loaded once, for the first prompt; empty text
chunks of a plain stream are skipped;
``/version`` says ``0.32.0+pdsim``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from pdsim.config import SimConfig
from pdsim.control import add_control_routes
from pdsim.endpoints import Endpoints
from pdsim.engine import Engine, Sequence
from pdsim.faults import FaultState
from pdsim.generate import Generate
from pdsim.instance import SIM_VERSION, Instance
from pdsim.kvcache import num_blocks_for
from pdsim.kvevents import KvEventPublisher
from pdsim.lmcache.mode import LMCacheMode
from pdsim.metrics import Metrics
from pdsim.nixl import NixlConsumer, producer_params
from pdsim.records import Records
from pdsim.sidechannel import side_channel_app
from pdsim.tokenizer import SimTokenizer
from pdsim.web import MAX_BODY, fastapi_http_errors
from proxy.engines.kvevents_wire import Event

log = logging.getLogger(__name__)


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
        self.lmcache: LMCacheMode | None = None
        self.kv_events: KvEventPublisher | None = None

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
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        if cfg.lmcache is not None:
            self.lmcache = LMCacheMode(cfg.lmcache, cfg.timing, self.metrics)
            await self.lmcache.start()
        if cfg.kv_events is not None:
            self.kv_events = KvEventPublisher(cfg.kv_events)
        self._engine = Engine(
            cfg,
            self.tokenizer,
            self.metrics,
            self._producer_params,
            on_prefilled=self.lmcache.on_prefilled if self.lmcache is not None else None,
            kv_events=self._publish_kv_events if self.kv_events is not None else None,
        )
        consumer = NixlConsumer(
            self._session,
            cfg.timing,
            self.metrics,
            cfg.kv_load_failure_policy == "fail",
            lambda: self.faults.current.kv_xfer_gbps,
        )
        side = side_channel_app(
            self.engine_id, self._engine.pool, lambda: self.faults.current.side_channel_error
        )
        self.side_channel_port = await self._serve(side, cfg.side_channel_port)
        instance = Instance(
            cfg,
            self._engine,
            self.tokenizer,
            self.metrics,
            self.records,
            self.faults,
            consumer,
            self.lmcache,
            self.system_fingerprint,
        )
        self.port = await self._serve(self._build_app(instance), cfg.port)
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
        if self.kv_events is not None:
            await self.kv_events.close()
            self.kv_events = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _build_app(self, instance: Instance) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[fastapi_http_errors])
        Generate(instance).add_routes(app)
        Endpoints(instance).add_routes(app)
        add_control_routes(app, self.records, self.faults, self._info, self.engine.cached_tokens)
        if self.lmcache is not None:
            self.lmcache.add_routes(app)
        if self.config.request_id_headers:
            app.on_response_prepare.append(_echo_request_id)
        return app

    def _publish_kv_events(self, events: list[Event]) -> None:
        assert self.kv_events is not None
        self.kv_events.publish(events, send=not self.faults.current.kv_events_unsent)

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


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """vLLM's --enable-request-id-headers: the client's id, else a fresh uuid (not the one
    in the body's ``id``)."""
    response.headers["X-Request-Id"] = request.headers.get("X-Request-Id", uuid.uuid4().hex)


async def start_sim(config: SimConfig | None = None) -> SimServer:
    """Start one simulated vLLM instance in the running loop (``port=0`` picks a free port)."""
    server = SimServer(config or SimConfig())
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    return server
