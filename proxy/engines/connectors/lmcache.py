"""LMCache PD (LMCacheConnectorV1 with `enable_pd`): the prefiller pushes the KV to the decoder.

Prefill leg: the client's request, capped at one token, not streamed, with
`kv_transfer_params: {"ret_first_tok": true, "disagg_spec": {...}}` naming a fresh request id and
the chosen decoder's LMCache receiver (host, one init and one alloc port per decoder TP rank).
While the prefiller computes, its LMCache pushes the KV chunks straight into the decoder, then
each TP rank sends a `ProxyNotif(req_id)` to our PULL socket (`lmcache_notify`).

The proxy waits for one notification per decoder TP rank, with a deadline (`lmcache.notify_timeout`
after the prefill answered). LMCache sends none for a prompt shorter than one chunk in 0.3.12 to
0.4.1 (#2510; other versions save the partial chunk in PD mode and do notify) or with
`discard_partial_chunks`; none while the decoder's `pd_buffer_size` has no room for the push (seen
with 0.5.0 on an H200 under load: benchmarks/results/gpu-h200.md); none from a prefiller not
configured for PD. On the deadline the client gets a 504
(`KVTransferTimeout`: not an engine failure, so the handler neither retries it on another
prefiller nor counts it against the prefiller's health), or with `on_timeout: fallback` the
decoder recomputes the prompt (counted). When the blocked pushes hold the prefiller's own staging
buffer, its engine blocks in its save and answers nothing at all: the stall watch
(proxy.control.stall) takes such a prefiller out of rotation.

Decode leg: the client's own request, unchanged: the decoder finds the pushed KV by the hash of
the prompt's token chunks, so chat stays chat, with its tools, usage and streaming.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from time import perf_counter
from typing import Any, ClassVar

import orjson
from prometheus_client import CollectorRegistry

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Handoff, Setup, TransferMetrics, prefill_response
from proxy.engines.connectors.lmcache_config import (
    LMCacheConfig,
    LMCacheReceiverConfig,
    Receiver,
    receiver_for,
    resolve_receivers,
)
from proxy.engines.connectors.lmcache_notify import Notifications
from proxy.errors import KVTransferTimeout, ProxyError
from proxy.request import ClientRequest

log = logging.getLogger("pdproxy")

# Fields that would stream the one-token prefill, or that the prefill leg must not carry over.
_PREFILL_DROP = ("stream_options", "min_tokens", "min_completion_tokens", "kv_transfer_params")


TRANSFER_PREFIX = "pdp-lmc-"


def new_transfer_id(prefix: str = TRANSFER_PREFIX) -> str:
    """A transfer id unique across proxy restarts and replicas (random, not a counter); a serving
    process's prefix names it (`pdp-lmc-w2-`), so that its notifications reach it."""
    return f"{prefix}{uuid.uuid4().hex}"


def disagg_spec(req_id: str, receiver: Receiver) -> dict[str, Any]:
    """LMCache's `disagg_spec` (read by `vllm_v1_adapter`'s `DisaggSpec`): lists of ports, one
    per TP rank; prefiller TP rank r pushes to `receiver_init_port[r]`/`receiver_alloc_port[r]`."""
    return {
        "req_id": req_id,
        "receiver_host": receiver.host,
        "receiver_init_port": list(receiver.init_ports),
        "receiver_alloc_port": list(receiver.alloc_ports),
    }


def prefill_body(body: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    leg = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    leg["stream"] = False
    leg["max_tokens"] = 1
    if "max_completion_tokens" in body:
        leg["max_completion_tokens"] = 1
    leg["n"] = 1
    leg["kv_transfer_params"] = {"ret_first_tok": True, "disagg_spec": spec}
    return leg


def first_token_params(raw: bytes, prefiller: Worker) -> dict[str, Any] | None:
    """The prefiller's `kv_transfer_params` (`{"first_tok": id}`), or None when it sent none."""
    params = prefill_response(raw, prefiller).get("kv_transfer_params")
    if isinstance(params, dict) and "first_tok" in params:
        return params
    return None


class LMCacheConnector:
    name: ClassVar[str] = "lmcache"
    label: ClassVar[str] = "LMCache"
    vllm_connector: ClassVar[str] = "LMCacheConnectorV1"
    pool_engines: ClassVar[bool] = (
        False  # LMCache PD pushes one way, sender to receiver: no kv_both
    )
    decoder_receivers: ClassVar[bool] = (
        True  # the prefiller pushes into the decoder's receiver ports
    )
    transfer_metrics: ClassVar[TransferMetrics | None] = None  # each transfer is notified instead
    single_proxy: ClassVar[str | None] = (
        "an LMCache prefiller sends its 'transfer done' notification to the one "
        "pd_proxy_host:port it was started with, so a request placed by any other replica would "
        "wait for a notification that never comes"
    )
    probe_words: ClassVar[int] = (
        400  # a prompt must fill one LMCache chunk for its transfer to be reported
    )

    @classmethod
    def receivers(
        cls, decoders: Sequence[tuple[str, LMCacheReceiverConfig | None]]
    ) -> list[Receiver | None]:
        return list(resolve_receivers(decoders))

    @classmethod
    def receiver_for(
        cls, url: str, given: LMCacheReceiverConfig | None, taken: Sequence[Receiver]
    ) -> Receiver | None:
        return receiver_for(url, given, taken)

    @classmethod
    def build(cls, setup: Setup) -> LMCacheConnector:
        return cls(setup.engine, setup.prefill_timeout, setup.lmcache, setup.metrics)

    def __init__(
        self,
        engine: EngineClient,
        prefill_timeout: float,
        config: LMCacheConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._engine = engine
        self._prefill_timeout = prefill_timeout
        self._config = config
        self.notifications = Notifications(
            config.notify_host, config.notify_port, config.late_memory, registry
        )
        self.transfer_prefix = TRANSFER_PREFIX  # a serving process's names it (proxy.procs.notify)

    def __repr__(self) -> str:
        return f"<LMCacheConnector {self.notifications!r}>"

    async def start(self) -> None:
        await self.notifications.start()

    async def close(self) -> None:
        await self.notifications.close()

    async def prefill(self, request: ClientRequest, prefiller: Worker, decoder: Worker) -> Handoff:
        receiver = decoder.lmcache
        if (
            receiver is None
        ):  # every decoder gets one when it joins (proxy.engines.connectors.lmcache_config)
            raise ProxyError(f"decode worker {decoder.url} has no LMCache receiver address")
        req_id = new_transfer_id(self.transfer_prefix)
        body = orjson.dumps(prefill_body(request.body, disagg_spec(req_id, receiver)))
        # Registered before the prefill is sent: the notification may beat the HTTP answer.
        with self.notifications.expect(req_id, receiver.tp) as waiter:
            raw = await self._engine.call(
                prefiller, request.path, body, request.request_id, self._prefill_timeout, "prefill"
            )
            params = first_token_params(raw, prefiller)
            if params is None:
                reason = (
                    "prefiller returned no kv_transfer_params.first_tok (is LMCacheConnectorV1 "
                    "with enable_pd and pd_role sender set?)"
                )
                return Handoff(None, reason, "missing_params")
            answered = perf_counter()
            try:
                async with asyncio.timeout(self._config.notify_timeout):
                    await waiter.wait()
            except TimeoutError:
                return self._missed(req_id, waiter.received, receiver, prefiller, decoder)
            log.debug(
                "request %s: LMCache transfer %s done %.1f ms after the prefill answered",
                request.request_id,
                req_id,
                (perf_counter() - answered) * 1000,
            )
        return Handoff(params)

    def _missed(
        self,
        req_id: str,
        received: int,
        receiver: Receiver,
        prefiller: Worker,
        decoder: Worker,
    ) -> Handoff:
        timeout = self._config.notify_timeout
        what = (
            f"prefill worker {prefiller.url} did not report its LMCache KV transfer {req_id} to "
            f"decode worker {decoder.url} within {timeout:g} s (got {received} of {receiver.tp} "
            f"notifications on tcp://{self.notifications.host}:{self.notifications.port}; "
            "the prefiller's pd_proxy_host/pd_proxy_port must name this address; LMCache sends "
            "none for a prompt shorter than one chunk in 0.3.12-0.4.1 (#2510) or with "
            "discard_partial_chunks, nor while the decoder's pd_buffer_size is full)"
        )
        action = self._config.on_timeout
        self.notifications.metrics.timeouts.labels(action).inc()
        if action == "fallback":
            return Handoff(None, what, "lmcache_notify_timeout")
        raise KVTransferTimeout(f"prefill: {what}")

    def decode_body(self, request: ClientRequest, handoff: Handoff) -> bytes:
        """The client's own request: the decoder finds the pushed KV by the prompt's chunks."""
        body = request.body
        if "kv_transfer_params" in body:
            body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
        return orjson.dumps(body)
