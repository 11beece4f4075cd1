"""The leader reads the other replicas' placed prompt tokens (proxy.control.membership.peers):
replicas found by label in the fake API server, each a real /metrics endpoint on its own port.
A first read sets where a counter stands, a later one adds the rise, a counter that went back
counts from zero, its own pod and a replica that cannot be read add nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from lightkube import AsyncClient, KubeConfig
from prometheus_client import CollectorRegistry, Counter, start_http_server

from pdsim.launch import free_port
from proxy.config import load_config
from proxy.control.membership.kubernetes import peer_load
from proxy.control.membership.leader import LeaderElector
from proxy.control.pool import PoolController
from proxy.control.registry import WorkerRegistry
from tests.control.membership.fakeapi import FakeApi
from tests.control.membership.kube import kubeconfig


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    yield server
    server.close()


class Peer:
    """A replica's /metrics: its placed prompt tokens by side."""

    def __init__(self) -> None:
        self.port = free_port()
        self.registry = CollectorRegistry()
        self.tokens = Counter("pdproxy_pool_prompt_tokens", "t", ["side"], registry=self.registry)
        self.server, _ = start_http_server(self.port, "127.0.0.1", self.registry)

    def restart(self) -> None:
        """Its counters start again from zero (the replica restarted)."""
        self.registry.unregister(self.tokens)
        self.tokens = Counter("pdproxy_pool_prompt_tokens", "t", ["side"], registry=self.registry)


def placed(pool: PoolController) -> tuple[int, int]:
    """The prompt tokens the controller's window holds: long, local."""
    held = list(pool.controller.load._prompts)
    return sum(t for _, t, long in held if long), sum(t for _, t, long in held if not long)


def test_the_leader_adds_what_each_other_replica_placed_since_its_last_read(
    tmp_path: Path, api: FakeApi
) -> None:
    peers = [Peer(), Peer()]
    labels = {"app": "pdproxy"}
    api.put("r0", labels, free_port())  # this replica's own pod: never read
    api.put("r1", labels, peers[0].port)
    api.put("r2", labels, peers[1].port)
    api.put("r3", labels, free_port())  # nobody listens: unreadable
    api.put("engine", {"app": "vllm"}, free_port())  # not a replica
    cfg = load_config(
        None,
        pool=["http://10.0.0.1:8000"],
        pool_mode="adaptive",
        pool_planner={"window": 60},
        discovery={
            "source": "kubernetes",
            "selectors": {"pool": "app=vllm"},
            "leader": {"identity": "r0", "renew_interval": 0.2, "peers": "app=pdproxy"},
        },
    )
    registry = WorkerRegistry.empty(3, 1.0)
    pools = (registry.pools["prefill"], registry.pools["decode"], registry.pools["pool"])
    pool = PoolController(pools, cfg.pool_planner, cfg.pool_mode, CollectorRegistry())
    assert cfg.discovery.leader is not None
    elector = LeaderElector(cfg.discovery.leader, "r0")
    elector.leading = True
    load = peer_load(cfg.discovery, elector, pool, CollectorRegistry())
    assert load is not None

    async def scenario() -> None:
        assert load is not None
        load.client = AsyncClient(KubeConfig.from_file(str(kubeconfig(tmp_path, api))))
        async with httpx2.AsyncClient(timeout=2) as http:
            peers[0].tokens.labels("long").inc(1000)  # before the first read: not counted
            await load.step(http)
            assert sorted(load.peers) == ["r1", "r2", "r3"]
            assert placed(pool) == (0, 0)
            peers[0].tokens.labels("long").inc(300)
            peers[1].tokens.labels("local").inc(50)
            await load.step(http)
            assert placed(pool) == (300, 50)
            peers[1].restart()
            peers[1].tokens.labels("local").inc(20)
            await load.step(http)
            assert placed(pool) == (300, 70)
        assert load.state.labels("read")._value.get() == 2
        assert load.state.labels("unreadable")._value.get() == 1
        await load.client.close()

    try:
        asyncio.run(scenario())
    finally:
        for peer in peers:
            peer.server.shutdown()
            peer.server.server_close()
