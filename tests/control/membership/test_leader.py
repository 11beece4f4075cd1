"""Leader election among replicas (proxy.control.membership.leader) against the fake API
server's Leases: one holder, a takeover within the lease duration, 409s for the losers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.coordination_v1 import Lease
from prometheus_client import CollectorRegistry

from proxy.control.membership.config import LeaderConfig
from proxy.control.membership.leader import LeaderElector
from tests.control.membership.fakeapi import FakeApi
from tests.control.membership.kube import kubeconfig

CONFIG = LeaderConfig(lease_name="test-leader", lease_duration=2.0, renew_interval=0.2)


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    yield server
    server.close()


def electors(tmp: Path, api: FakeApi, names: list[str]) -> list[LeaderElector]:
    config = KubeConfig.from_file(str(kubeconfig(tmp, api)))
    made = []
    for name in names:
        elector = LeaderElector(CONFIG, name, CollectorRegistry())
        elector.client = AsyncClient(config, namespace="default")
        made.append(elector)
    return made


def value(elector: LeaderElector, name: str) -> float:
    for metric in elector.changes.collect():
        for sample in metric.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(name)


async def until(check: object, limit: float) -> float:
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < limit, "not within the limit"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_one_holder_a_takeover_after_the_holder_dies_and_a_release(
    tmp_path: Path, api: FakeApi
) -> None:
    async def scenario() -> None:
        a, b, c = electors(tmp_path, api, ["proxy-a", "proxy-b", "proxy-c"])
        # all three at once: the API server takes one create; the others get 409 and follow
        await asyncio.gather(a.step(), b.step(), c.step())
        await asyncio.gather(a.step(), b.step(), c.step())
        leaders = [e for e in (a, b, c) if e.leading]
        assert len(leaders) == 1
        first = leaders[0]
        assert {e.holder for e in (a, b, c)} == {first.identity}
        print(f"\nfirst round: {first.identity} leads; 409s answered: {api.objects.conflicts}")

        tasks = {e.identity: asyncio.create_task(e.run()) for e in (a, b, c)}
        await asyncio.sleep(0.5)
        assert [e.identity for e in (a, b, c) if e.leading] == [first.identity]
        tasks.pop(first.identity).cancel()  # dies without releasing: the Lease must expire
        died = time.monotonic()
        rest = [e for e in (a, b, c) if e is not first]
        took = await until(lambda: any(e.leading for e in rest), 3 * CONFIG.lease_duration)
        second = next(e for e in rest if e.leading)
        await asyncio.sleep(0.3)
        assert [e.identity for e in rest if e.leading] == [second.identity]
        lease = await second.client.get(Lease, CONFIG.lease_name)  # type: ignore[union-attr]
        assert lease.spec.holderIdentity == second.identity and lease.spec.leaseTransitions == 1
        print(f"leader failover: {second.identity} took the Lease {took:.2f}s after "
              f"{first.identity} died (lease duration {CONFIG.lease_duration:g}s, renew "
              f"{CONFIG.renew_interval:g}s)")  # fmt: skip
        assert time.monotonic() - died >= CONFIG.lease_duration  # never before it expired
        assert value(second, "pdproxy_discovery_leader_changes_total") == 1

        tasks.pop(second.identity).cancel()
        await second.release()  # a clean stop: the last one takes it at its next read
        third = next(e for e in rest if e is not second)
        took = await until(lambda: third.leading, CONFIG.lease_duration)
        print(f"after a release: {third.identity} took the Lease {took:.2f}s later")
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for e in (a, b, c):
            await e.client.close()  # type: ignore[union-attr]

    asyncio.run(scenario())
