"""Workers joining and leaving at run time: ids, atomic snapshots, drain, and what is forgotten."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from proxy.control.registry import RegistryError, WorkerRegistry
from proxy.control.workers import Health, Lifecycle
from proxy.observe.metrics import ProxyMetrics
from proxy.place.policies import RequestInfo, make_policy
from proxy.place.prefix import prefix_blocks


def registry(prefill: int = 1, decode: int = 1) -> WorkerRegistry:
    reg = WorkerRegistry.empty()
    for i in range(prefill):
        reg.add("prefill", f"http://p{i}")
    for i in range(decode):
        reg.add("decode", f"http://d{i}")
    return reg


def test_ids_follow_config_order_and_are_never_reused() -> None:
    reg = registry(2, 2)
    assert [w.id for w in reg] == ["p0", "p1", "d0", "d1"]
    d1 = reg.find("d1")
    assert d1 is not None and reg.find("http://d1/") is d1 and reg.find("HTTP://D1:80") is d1
    reg.remove(d1)
    assert reg.add("decode", "http://d1").id == "d2"  # same URL again: a new worker, a new id
    assert reg.find("d1") is None
    restored = WorkerRegistry.empty()
    assert restored.add("decode", "http://x", worker_id="d7").id == "d7"
    assert restored.add("decode", "http://y").id == "d8"


def test_a_refused_candidate_gives_its_id_back_a_routed_one_never() -> None:
    reg = registry()
    reg.discard(reg.candidate("decode", "http://x"))
    reg.discard(reg.candidate("decode", "http://y"))
    probing = reg.candidate("decode", "http://z")
    assert probing.id == "d1"  # the refused ones left no gap
    later = reg.candidate("decode", "http://w")
    reg.discard(probing)  # refused while a later one is still probed: d1 stays a gap
    reg.activate(later)
    assert (later.id, reg.candidate("decode", "http://v").id) == ("d2", "d3")
    reg.remove(later)
    assert reg.add("decode", "http://u").id == "d4"  # d2 was routed: never again


def test_duplicates_are_refused_by_role() -> None:
    reg = registry()
    with pytest.raises(RegistryError, match="already known as d0"):
        reg.candidate("decode", "http://d0/")
    with pytest.raises(RegistryError, match=r"already known as d0 \(decode worker http://d0, "):
        reg.candidate("decode", "HTTP://D0.:80")  # the same address, spelled otherwise
    with pytest.raises(RegistryError, match="already known as p0"):
        reg.candidate("pool", "http://p0")  # dedicated or in the pool, never both
    reg.add("prefill", "http://d0")  # the same engine in the other role is another worker
    with pytest.raises(RegistryError, match="taken"):
        reg.candidate("decode", "http://z", worker_id="p0")


def test_a_candidate_is_listed_but_never_routed_until_activated() -> None:
    reg = registry()
    pool = reg.pools["decode"]
    seen = pool.workers
    new = reg.candidate("decode", "http://d1")
    assert new.state is Lifecycle.PROBING and new in list(reg)
    assert new not in pool.workers and new not in pool.members
    reg.activate(new)
    assert new.state is Lifecycle.ACTIVE and pool.workers[-1] is new
    assert len(seen) == 1  # a snapshot taken before the change is untouched
    reg.discard(reg.candidate("decode", "http://d2"))
    assert [w.id for w in reg] == ["p0", "d0", "d1"]


def test_drain_stops_routing_while_requests_in_flight_finish() -> None:
    reg = registry(decode=2)
    pool = reg.pools["decode"]
    d0, d1 = pool.workers
    policy = make_policy("least_loaded")
    info = RequestInfo("r", 10)
    with pool.track(d0, 10):
        reg.drain(d0)
        assert d0.state is Lifecycle.DRAINING
        assert pool.workers == (d1,) and pool.members == (d0, d1)
        assert policy.select(pool.workers, info) == 0  # d1, the only one routed
        with pytest.raises(RegistryError, match="draining"):
            reg.drain(d0)
    assert (d0.inflight, d0.inflight_chars) == (0, 0)  # its counters still end at zero
    reg.remove(d0)
    assert d0.state is Lifecycle.REMOVED and pool.members == (d1,)


def test_removal_tells_listeners_and_prefix_ownership_is_forgotten() -> None:
    reg = registry(decode=2)
    pool = reg.pools["decode"]
    policy = make_policy("prefix_aware")
    reg.on_removed.append(lambda w: policy.forget(w.url))
    prompt = "system prompt shared by a tenant " * 20
    info = RequestInfo("r", len(prompt), prompt, tuple(prefix_blocks(prompt, 256)))
    first = pool.workers[policy.select(pool.workers, info) or 0]
    assert policy.index.matched(prefix_blocks(prompt, 256)) == {first.url: 2}
    reg.remove(first)
    assert policy.index.matched(prefix_blocks(prompt, 256)) == {}
    assert len(policy.index) == 0
    assert pool.workers[policy.select(pool.workers, info) or 0].url != first.url


def test_a_new_worker_takes_the_roles_panic_setting() -> None:
    reg = registry(decode=1)
    pool = reg.pools["decode"]
    pool.record_check(pool.workers[0], False, "down")
    pool.refresh()
    assert pool.panic
    new = reg.add("decode", "http://d1")
    assert new.health_ignored  # same as the others until the next refresh says otherwise
    pool.refresh()
    assert not pool.panic and new.available and not pool.workers[0].available
    pool.record_check(new, True)
    assert new.health is Health.HEALTHY


def test_removed_workers_leave_metrics() -> None:
    reg = registry(decode=2)
    metrics = ProxyMetrics(tuple(reg.pools.values()))
    text = generate_latest(metrics.registry).decode()
    assert 'url="http://d1"' in text
    d1 = reg.find("d1")
    assert d1 is not None
    reg.drain(d1)
    assert 'pdproxy_worker_inflight_requests{role="decode",url="http://d1"}' in (
        generate_latest(metrics.registry).decode()
    )  # still serving what it has
    reg.remove(d1)
    assert "http://d1" not in generate_latest(metrics.registry).decode()


def test_retire_waits_for_in_flight_requests() -> None:
    async def main() -> None:
        reg = registry(decode=2)
        pool = reg.pools["decode"]
        d0 = pool.workers[0]
        released = asyncio.Event()

        async def request() -> None:
            with pool.track(d0, 1):
                await released.wait()

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        retiring = asyncio.create_task(reg.retire(d0, 5.0, lambda tasks, why: None))
        await asyncio.sleep(0.05)
        assert d0.state is Lifecycle.DRAINING and not retiring.done()
        released.set()
        await asyncio.wait_for(retiring, 1)
        await task
        assert d0.state is Lifecycle.REMOVED and pool.members == (pool.workers[0],)

    asyncio.run(main())


def test_retire_ends_what_outlives_the_drain_timeout() -> None:
    async def main() -> None:
        reg = registry(decode=2)
        pool = reg.pools["decode"]
        d0 = pool.workers[0]
        ended: list[tuple[int, str]] = []

        async def request() -> None:
            with pool.track(d0, 1, owner=asyncio.current_task()):  # as the request path does
                await asyncio.sleep(60)

        task = asyncio.create_task(request())
        await asyncio.sleep(0)

        def end(tasks: object, why: str) -> None:
            ended.append((len(list(tasks)), why))  # type: ignore[call-overload]
            task.cancel()

        await asyncio.wait_for(reg.retire(d0, 0.1, end), 2)
        assert ended == [(1, "decode worker http://d0 was removed before the answer was complete")]
        assert task.cancelled() and d0.inflight == 0 and d0.state is Lifecycle.REMOVED

    asyncio.run(main())
