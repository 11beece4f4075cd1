"""The connectors by config name: a new connector is one module beside this one and one line here.

Config validation, the admin API and the admission probes ask a connector's class for its facts
(`ConnectorClass`) through this table; nothing else names a connector.
"""

from __future__ import annotations

from proxy.engines.connectors.base import ConnectorClass
from proxy.engines.connectors.lmcache import LMCacheConnector
from proxy.engines.connectors.nixl import NixlConnector

CONNECTORS: dict[str, ConnectorClass] = {
    NixlConnector.name: NixlConnector,
    LMCacheConnector.name: LMCacheConnector,
}


def connector_class(name: str) -> ConnectorClass:
    try:
        return CONNECTORS[name]
    except KeyError:
        raise ValueError(f"unknown connector {name!r}; choose from {sorted(CONNECTORS)}") from None


def pool_connectors() -> list[str]:
    """The connectors whose engines may both prefill and decode: those a pool may use."""
    return [name for name, kind in CONNECTORS.items() if kind.pool_engines]


def replica_connectors() -> list[str]:
    """The connectors several proxy replicas may share engines with."""
    return [name for name, kind in CONNECTORS.items() if kind.single_proxy is None]
