"""The connectors by name, and the facts each class carries for start-up: the config, the admin
API and the probes ask the class, and nothing outside the connectors names one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.engines.client import EngineClient
from proxy.engines.connectors.factory import make_connector
from proxy.engines.connectors.lmcache import LMCacheConnector
from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig, Receiver
from proxy.engines.connectors.nixl import NIXL_METRICS, NixlConnector
from proxy.engines.connectors.registry import (
    CONNECTORS,
    connector_class,
    pool_connectors,
    replica_connectors,
)

PROXY = Path(__file__).resolve().parents[3] / "proxy"
DECODERS = [("http://10.0.0.1:8200", None), ("http://10.0.0.1:8201", None)]


def test_each_name_maps_to_its_class() -> None:
    assert dict(CONNECTORS) == {"nixl": NixlConnector, "lmcache": LMCacheConnector}
    assert all(kind.name == name for name, kind in CONNECTORS.items())
    with pytest.raises(ValueError, match=r"unknown connector 'rdma'; choose from \['lmcache', "):
        connector_class("rdma")


@pytest.mark.parametrize(
    ("name", "pool", "receivers", "metrics", "words"),
    [("nixl", True, False, NIXL_METRICS, 48), ("lmcache", False, True, None, 400)],
)
def test_start_up_facts(
    name: str, pool: bool, receivers: bool, metrics: object, words: int
) -> None:
    kind = connector_class(name)
    assert (kind.pool_engines, kind.decoder_receivers) == (pool, receivers)
    assert (kind.transfer_metrics, kind.probe_words) == (metrics, words)
    assert pool_connectors() == ["nixl"]
    assert replica_connectors() == ["nixl"]  # an LMCache prefiller notifies one proxy
    assert (kind.single_proxy is None) == (name == "nixl")


def test_receivers_only_where_the_prefiller_pushes() -> None:
    assert NixlConnector.receivers(DECODERS) == [None, None]
    assert NixlConnector.receiver_for("http://10.0.0.1:8202", None, []) is None
    assert LMCacheConnector.receivers(DECODERS) == [
        Receiver("10.0.0.1", (7300,), (7400,)),
        Receiver("10.0.0.1", (7301,), (7401,)),
    ]
    taken = [Receiver("10.0.0.1", (7300,), (7400,))]
    assert LMCacheConnector.receiver_for("http://10.0.0.1:8202", None, taken) == Receiver(
        "10.0.0.1", (7301,), (7401,)
    )
    clash = LMCacheReceiverConfig(init_ports=(7300,), alloc_ports=(7400,))
    with pytest.raises(ValueError, match="used by another decoder"):
        LMCacheConnector.receiver_for("http://10.0.0.1:8202", clash, taken)


def test_the_config_asks_the_class() -> None:
    with pytest.raises(ConfigError, match=r"connector: unknown connector 'rdma'; choose from"):
        load_config(None, prefill=["http://p:1"], decode=["http://d:1"], connector="rdma")
    with pytest.raises(ConfigError, match="a pool needs connector nixl"):
        load_config(None, pool=["http://a:1"], connector="lmcache")
    clash = {"url": "http://d:2", "lmcache": {"init_ports": [7300], "alloc_ports": [7400]}}
    with pytest.raises(ConfigError, match="LMCache port d:7300 is used twice"):
        load_config(None, prefill=["http://p:1"], decode=["http://d:1", clash], connector="lmcache")
    nixl = load_config(None, prefill=["http://p:1"], decode=["http://d:1", clash])
    assert nixl.connector == "nixl"  # the ports mean nothing to NIXL: nothing to clash


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_make_connector_builds_the_configured_class(name: str) -> None:
    config = load_config(None, prefill=["http://p:1"], decode=["http://d:1"], connector=name)
    connector = make_connector(config, EngineClient(1.0))
    assert type(connector) is CONNECTORS[name] and connector.name == name


def test_nothing_outside_the_connectors_asks_for_one_by_name() -> None:
    asks = re.compile(r"""connector(\.name)?\s*[!=]=\s*["']|["'](nixl|lmcache)["']\s*[!=]=""")
    found = [
        f"{path.relative_to(PROXY)}:{n}"
        for path in PROXY.rglob("*.py")
        if "connectors" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if asks.search(line)
    ]
    assert found == []
