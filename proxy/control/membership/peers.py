"""The whole fleet's prompt load, for the leader's pool controller (`discovery.leader.peers`).

Each replica counts the prompt tokens it placed, by side, in `pdproxy_pool_prompt_tokens_total
{side="long"|"local"}` (proxy.control.pool). Behind a balancer that spreads the requests, a
replica places only its share of them, so the leader, which decides the pool's leans for all,
would size the pool for that share. While it holds the Lease it finds the other replicas by
label (the pods `peers` names, Ready, other than its own pod), reads each one's counters from its
`/metrics` every controller interval, and gives the controller what each placed since the last
read, beside what it placed itself. A replica's first read only sets where its counters stand;
a counter that went back (the replica restarted) counts from zero; a replica that cannot be read
adds nothing that round (logged once, `pdproxy_discovery_peers{state}`). The stream counts need
none of this: they come from the engines, whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Pod
from prometheus_client import CollectorRegistry, Gauge

from proxy.control.membership.config import DiscoveryConfig
from proxy.control.membership.leader import LeaderElector
from proxy.control.membership.pods import view
from proxy.control.pool import PoolController
from proxy.engines.promtext import parse

log = logging.getLogger("pdproxy")

COUNTER = "pdproxy_pool_prompt_tokens_total"
Counts = tuple[float, float]  # long, local


class PeerLoad:
    def __init__(
        self,
        config: DiscoveryConfig,
        selector: dict[str, Any],
        elector: LeaderElector,
        pool: PoolController,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        assert config.leader is not None and config.leader.peers is not None
        self.client: AsyncClient | None = None  # the discovery's, once it has started
        self.config = config
        self.selector = selector
        self.elector = elector
        self.pool = pool
        self.peers: dict[str, str] = {}  # pod name -> its /metrics URL
        self.seen: dict[str, Counts] = {}  # pod name -> its counters at the last read
        self._listed = 0.0
        self._failing: set[str] = set()
        self.state = Gauge(
            "pdproxy_discovery_peers",
            "other replicas the leader reads the prompt load of: read (in the last round), "
            "unreadable",
            ["state"],
            registry=metrics,
        )

    async def run(self) -> None:
        """Every controller interval, while leading (cancel to stop)."""
        async with httpx2.AsyncClient(timeout=self.pool.config.interval) as http:
            while True:
                await asyncio.sleep(self.pool.config.interval)
                if not self.elector.leading:
                    self.seen.clear()  # a later term starts from fresh baselines
                    continue
                try:
                    await self.step(http)
                except (ApiError, httpx2.HTTPError, OSError) as exc:
                    log.warning("peers: cannot list the other replicas (%s: %s)",
                                type(exc).__name__, exc)  # fmt: skip

    async def step(self, http: httpx2.AsyncClient) -> None:
        assert self.config.leader is not None
        if time.monotonic() - self._listed >= self.config.leader.renew_interval:
            await self._list()
        peers = list(self.peers.items())
        read = await asyncio.gather(*(self._read(http, name, url) for name, url in peers))
        long = local = 0.0
        for (name, _), counts in zip(peers, read, strict=True):
            if counts is None:
                continue
            before = self.seen.get(name)
            self.seen[name] = counts
            if before is None:
                continue  # its first read: where its counters stand
            long += _rise(counts[0], before[0])
            local += _rise(counts[1], before[1])
        for name in set(self.seen) - set(self.peers):
            del self.seen[name]
        self.pool.peer_prompts(int(long), int(local))
        unread = sum(1 for counts in read if counts is None)
        self.state.labels("read").set(len(read) - unread)
        self.state.labels("unreadable").set(unread)

    async def _list(self) -> None:
        assert self.client is not None
        c = self.config
        found: dict[str, str] = {}
        async for pod in self.client.list(Pod, labels=self.selector):
            seen = view(pod, "pool", c.port_name, c.port_annotation, "", "")
            name = seen.name.split("/", 1)[1]
            if seen.serves and seen.url and name != self.elector.identity:
                found[name] = seen.url + "/metrics"
        self.peers = found
        self._listed = time.monotonic()

    async def _read(self, http: httpx2.AsyncClient, name: str, url: str) -> Counts | None:
        try:
            resp = await http.get(url)
            resp.raise_for_status()
        except (httpx2.HTTPError, OSError) as exc:
            if name not in self._failing:
                log.warning("peers: cannot read replica %s's prompt load at %s (%s: %s)", name,
                            url, type(exc).__name__, exc)  # fmt: skip
            self._failing.add(name)
            return None
        self._failing.discard(name)
        sides = parse(resp.content, [COUNTER]).by_label(COUNTER, "side")
        return sides.get("long", 0.0), sides.get("local", 0.0)


def _rise(now: float, before: float) -> float:
    """A counter's rise since `before`; from zero when it went back (the replica restarted)."""
    return now - before if now >= before else now
