"""The control plane's build: the workers it starts with, what its one scraper watches, and its
loops started and stopped with the lifespan (real sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.auth import Authenticator
from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.control.plane import ControlPlane, initial_workers, make_kv_health, watches
from proxy.control.stall import WORK, StallWatch
from proxy.control.workers import Health
from proxy.engines.client import EngineClient
from proxy.engines.connectors.factory import make_connector
from proxy.engines.connectors.lmcache_config import Receiver
from proxy.engines.scrape import LOAD_METRICS
from tests.fakes import LoggingEngine

P, D = ["http://10.0.0.1:8100"], ["http://10.0.0.2:8200", "http://10.0.0.3:8200"]


def config(**overrides: Any) -> ProxyConfig:
    return load_config(None, **{"prefill": P, "decode": D, **overrides})


def test_configured_workers_in_config_order_with_their_receivers() -> None:
    registry = initial_workers(config(connector="lmcache"))
    assert [(w.id, w.url) for w in registry] == [
        ("p0", P[0]),
        ("d0", D[0]),
        ("d1", D[1]),
    ]
    assert [w.lmcache for w in registry.pools["decode"].workers] == [
        Receiver("10.0.0.2", (7300,), (7400,)),
        Receiver("10.0.0.3", (7301,), (7401,)),
    ]
    assert all(w.lmcache is None for w in initial_workers(config()))


def test_the_state_file_wins_and_must_suit_the_connector(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    path.write_text(
        '{"version": 1, "workers": [{"id": "p3", "role": "prefill", "url": "http://a:1"},'
        ' {"id": "d7", "role": "decode", "url": "http://b:1"}]}'
    )
    registry = initial_workers(config(workers_state_file=str(path)))
    assert [(w.id, w.url) for w in registry] == [("p3", "http://a:1"), ("d7", "http://b:1")]
    with pytest.raises(ConfigError, match="decoder d7 has no lmcache receiver"):
        initial_workers(config(workers_state_file=str(path), connector="lmcache"))


W = ("work", 15.0, 5.0)  # the stall watch's read of the work counters (stall_timeout 60 s)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, [("kv", 5.0, 5.0), W]),  # least_loaded reads no engine load
        ({"decode_policy": "load_aware"}, [("load", 0.25, 1.0), ("kv", 5.0, 5.0), W]),
        ({"conditional_disagg": {"enabled": True}}, [("load", 0.25, 1.0), ("kv", 5.0, 5.0), W]),
        (
            {"prefill_policy": "prefix_aware", "routing": {"scrape_interval": 0}},
            [("kv", 5.0, 5.0), W],
        ),
        ({"decode_policy": "load_aware", "connector": "lmcache"}, [("load", 0.25, 1.0), W]),
        ({"kv_health": {"enabled": False, "interval": 2}, "health": {"stall_timeout": 0}}, []),
        ({"kv_health": {"enabled": False}, "health": {"stall_timeout": 2}}, [("work", 1.0, 5.0)]),
        (
            {"pool": ["http://10.0.0.9:1"], "kv_health": {"interval": 2}, "health": {"timeout": 3}},
            [("load", 0.25, 1.0), ("kv", 2.0, 3.0), ("work", 15.0, 3.0)],
        ),
    ],
)
def test_what_the_scraper_watches(
    overrides: dict[str, Any], expected: list[tuple[str, float, float]]
) -> None:
    cfg = config(**overrides)
    stall = cfg.health.stall_timeout
    found = watches(cfg, make_kv_health(cfg), StallWatch(list, stall) if stall else None)
    kinds = {LOAD_METRICS: "load", WORK: "work"}
    assert [(kinds.get(w.names, "kv"), w.interval, w.timeout) for w in found] == expected


def test_start_runs_the_health_checks_and_close_stops_them() -> None:
    async def scenario() -> None:
        async with LoggingEngine() as server:
            await run(server)

    async def run(server: LoggingEngine) -> None:
        url = server.url
        cfg = config(prefill=[url], decode=[url], health={"interval": 0.05})
        engine = EngineClient(1.0)
        await engine.start()
        registry = initial_workers(cfg)
        plane = ControlPlane(
            cfg,
            engine,
            registry,
            make_connector(cfg, engine),
            Authenticator((), ()),
            CollectorRegistry(),
            lambda tasks, why: None,
        )
        await plane.start()
        await asyncio.sleep(0.3)
        await plane.close()
        checks = len(server.log)
        assert checks >= 4 and all(w.health is Health.HEALTHY for w in registry)
        await asyncio.sleep(0.2)
        assert len(server.log) == checks  # stopped
        await engine.close()

    asyncio.run(scenario())
