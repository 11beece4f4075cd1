"""KV-transfer protocols: how the prefill leg is asked for, and how its result reaches the decoder.

One module per protocol. A connector executes a decision already made (which prefiller, which
decoder); it never chooses workers. `make_connector` maps the config name to a class, once, at
start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from prometheus_client import CollectorRegistry

from proxy.config import ProxyConfig
from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
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


class Connector(Protocol):
    name: str

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


def make_connector(
    config: ProxyConfig, engine: EngineClient, registry: CollectorRegistry | None = None
) -> Connector:
    if config.connector == "nixl":
        from proxy.engines.connectors.nixl import NixlConnector

        return NixlConnector(engine, config.timeouts.prefill)
    if config.connector == "lmcache":
        from proxy.engines.connectors.lmcache import LMCacheConnector

        return LMCacheConnector(engine, config.timeouts.prefill, config.lmcache, registry)
    raise ValueError(f"unknown connector {config.connector!r}")
