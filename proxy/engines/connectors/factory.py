"""The configured connector, built once at start-up."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.config import ProxyConfig
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector, Setup
from proxy.engines.connectors.registry import connector_class


def make_connector(
    config: ProxyConfig, engine: EngineClient, registry: CollectorRegistry | None = None
) -> Connector:
    setup = Setup(engine, config.timeouts.prefill, config.lmcache, registry)
    return connector_class(config.connector).build(setup)
