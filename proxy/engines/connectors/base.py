"""KV-transfer protocols: how the prefill leg is asked for, and how its result reaches the decoder.

One module per protocol. A connector executes a decision already made (which prefiller, which
decoder); it never chooses workers. Its class carries the facts the rest of the proxy needs before
any request (`ConnectorClass`): config validation, the admin API and the admission probes ask the
class, never the connector's name. `registry.py` maps the config name to a class, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.lmcache_config import LMCacheConfig, LMCacheReceiverConfig, Receiver
from proxy.errors import UpstreamError
from proxy.request import ClientRequest


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the prefill leg produced for the decode leg.

    `kv_transfer_params` is None when the decoder will have to compute the prompt itself; then
    `recompute_reason` says why, and the proxy counts and logs it.
    """

    kv_transfer_params: dict[str, Any] | None
    recompute_reason: str | None = None
    recompute_kind: str = "none"  # short metric label for the reason

    @property
    def outcome(self) -> str:
        """`handed_over`, `local` (the decoder was chosen to prefill), or why it recomputes."""
        if self.kv_transfer_params is not None:
            return "handed_over"
        return "local" if self.recompute_reason is None else self.recompute_kind


def prefill_response(raw: bytes, prefiller: Worker) -> dict[str, Any]:
    """The prefiller's answer as a JSON object; anything else is the prefiller's failure."""
    try:
        response = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            f"prefill: prefill worker {prefiller.url} returned a body that is not JSON"
        ) from None
    if not isinstance(response, dict):
        raise UpstreamError(f"prefill: prefill worker {prefiller.url} returned {type(response)}")
    return response


@dataclass(frozen=True, slots=True)
class TransferMetrics:
    """Where a decoder counts the KV it received, in its own /metrics: running sums of the
    transfers, of the seconds spent in them and of their bytes (what KV health reads, and what
    proves a probe's pull), with the advice to give when the transfers are slow, and the advice
    when the engines are known to run with UCX_CUDA_IPC_ENABLE_GET_ZCOPY on (`%s`: its value)."""

    count: str
    seconds: str
    nbytes: str
    slow_advice: str
    zcopy_set_advice: str = ""


class Connector(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def vllm_connector(self) -> str: ...

    @property
    def transfer_metrics(self) -> TransferMetrics | None:
        """The decoders' own count of the KV they received (see `ConnectorClass`)."""
        ...

    @property
    def decoder_receivers(self) -> bool:
        """The KV goes into the chosen decoder (see `ConnectorClass`): a decode retried on
        another decoder computes the prompt again."""
        ...

    async def start(self) -> None:
        """Acquire what the connector listens on (sockets); called once in the app lifespan."""
        ...

    async def prefill(self, request: ClientRequest, prefiller: Worker, decoder: Worker) -> Handoff:
        """Run the prefill leg on `prefiller` for a decode that will run on `decoder`."""
        ...

    def decode_body(self, request: ClientRequest, handoff: Handoff) -> bytes:
        """The body to send to the decoder."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Setup:
    """What a connector is built from, once, at start-up."""

    engine: EngineClient
    prefill_timeout: float
    lmcache: LMCacheConfig  # the config's `lmcache:` section
    metrics: CollectorRegistry | None = None


class ConnectorClass(Protocol):
    """A connector's class: the facts read before any request, and how to build one."""

    name: str  # the config's `connector:` value
    label: str  # the protocol's name in messages
    vllm_connector: str  # the engines' kv_connector (their kv-transfer-config)
    # its engines may both prefill and decode (vLLM kv_role kv_both): a pool may use it
    pool_engines: bool
    # each decoder has a receiver the prefillers push into (host, ports), named when it joins
    decoder_receivers: bool
    # the decoders' own transfer metrics (KV health reads them), or None: the connector reports
    # each transfer done before the handoff, which proves it
    transfer_metrics: TransferMetrics | None
    # why one proxy must be the only one in front of its engines (several replicas cannot share
    # them), or None when replicas can
    single_proxy: str | None
    probe_words: int  # words in an admission probe's prompt, unless admin says

    def receivers(
        self, decoders: Sequence[tuple[str, LMCacheReceiverConfig | None]]
    ) -> list[Receiver | None]:
        """The configured decoders' receivers, in order; ValueError when they clash."""
        ...

    def receiver_for(
        self, url: str, given: LMCacheReceiverConfig | None, taken: Sequence[Receiver]
    ) -> Receiver | None:
        """The receiver of a decoder joining at run time; ValueError when it clashes."""
        ...

    def build(self, setup: Setup) -> Connector: ...
