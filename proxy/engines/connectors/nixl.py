"""vLLM NixlConnector: the decoder pulls the prompt's KV blocks from the prefiller.

Prefill leg: the client's request, capped at one token, unable to stop early (vLLM returns
`kv_transfer_params` only for a request that finished by length), with `do_remote_decode`.
Decode leg: the client's request plus the prefiller's `kv_transfer_params`, verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Handoff, Setup, TransferMetrics, prefill_response
from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig, Receiver
from proxy.request import ClientRequest

# Fields that would let the one-token prefill end before the length cap, or stream it.
_PREFILL_DROP = (
    "stream_options",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "min_completion_tokens",
    "kv_transfer_params",
)

REMOTE_DECODE_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


# vLLM's NIXL histograms on the decoder (the side that pulls)
NIXL_METRICS = TransferMetrics(
    count="vllm:nixl_xfer_time_seconds_count",
    seconds="vllm:nixl_xfer_time_seconds_sum",
    nbytes="vllm:nixl_bytes_transferred_sum",
    slow_advice=(
        "The KV is most likely moving over TCP instead of GPU to GPU. NIXL's UCX backend turns "
        "off cuda_ipc reads (the decoder's pull) where NVML reports no NVLink, as on PCIe-only "
        "and virtualised hosts: set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y in the environment of every "
        "engine (launchers/disagg.sh does unless told otherwise) and restart them; between "
        "hosts, make sure UCX_TLS allows an RDMA transport."
    ),
    zcopy_set_advice=(
        "The engines already run with UCX_CUDA_IPC_ENABLE_GET_ZCOPY=%s (as launched), so "
        "cuda_ipc reads are allowed: look elsewhere. A pull of many small pieces is slow even GPU "
        "to GPU (vLLM's per-layer layout moves one descriptor per layer and block: try larger "
        "blocks, --cross-layer-blocks, more NIXL threads); between hosts, make sure UCX_TLS "
        "allows an RDMA transport."
    ),
)


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    leg = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    leg["stream"] = False
    leg["max_tokens"] = 1
    if "max_completion_tokens" in body:
        leg["max_completion_tokens"] = 1
    leg["ignore_eos"] = True
    leg["n"] = 1
    leg["kv_transfer_params"] = dict(REMOTE_DECODE_PARAMS)
    return leg


def handoff_from_response(raw: bytes, prefiller: Worker) -> Handoff:
    response = prefill_response(raw, prefiller)
    params = response.get("kv_transfer_params")
    if isinstance(params, dict) and params:
        return Handoff(params)
    finish = None
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        finish = choices[0].get("finish_reason")
    if "kv_transfer_params" not in response:
        reason = "prefiller returned no kv_transfer_params (is its kv-transfer-config set?)"
        return Handoff(None, reason, "missing_params")
    reason = f"prefiller returned kv_transfer_params=null (finish_reason={finish})"
    return Handoff(None, reason, "null_params")


class NixlConnector:
    name: ClassVar[str] = "nixl"
    label: ClassVar[str] = "NIXL"
    vllm_connector: ClassVar[str] = "NixlConnector"
    pool_engines: ClassVar[bool] = True  # kv_both engines pull and are pulled from
    decoder_receivers: ClassVar[bool] = False  # the decoder pulls: nothing listens for a push
    transfer_metrics: ClassVar[TransferMetrics | None] = NIXL_METRICS
    single_proxy: ClassVar[str | None] = None  # the decoder pulls: any proxy may place requests
    probe_words: ClassVar[int] = 48

    @classmethod
    def receivers(
        cls, decoders: Sequence[tuple[str, LMCacheReceiverConfig | None]]
    ) -> list[Receiver | None]:
        return [None] * len(decoders)

    @classmethod
    def receiver_for(
        cls, url: str, given: LMCacheReceiverConfig | None, taken: Sequence[Receiver]
    ) -> Receiver | None:
        return None

    @classmethod
    def build(cls, setup: Setup) -> NixlConnector:
        return cls(setup.engine, setup.prefill_timeout)

    def __init__(self, engine: EngineClient, prefill_timeout: float) -> None:
        self._engine = engine
        self._timeout = prefill_timeout

    async def start(self) -> None:
        return None

    async def prefill(self, request: ClientRequest, prefiller: Worker, decoder: Worker) -> Handoff:
        raw = await self._engine.call(
            prefiller,
            request.path,
            orjson.dumps(prefill_body(request.body)),
            request.request_id,
            self._timeout,
            "prefill",
        )
        return handoff_from_response(raw, prefiller)

    def decode_body(self, request: ClientRequest, handoff: Handoff) -> bytes:
        body = request.body
        if handoff.kv_transfer_params is not None:
            body = {**body, "kv_transfer_params": handoff.kv_transfer_params}
        elif "kv_transfer_params" in body:
            body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
        return orjson.dumps(body)

    async def close(self) -> None:
        return None
