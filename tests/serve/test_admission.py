"""Admission control: unit behaviour of the slot queue, then through the proxy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.errors import TooManyRequests
from proxy.serve.admission import Admission
from tests.conftest import MODEL, Proxy, Sim, running, start_proxy, wait_for


def test_slots_queue_and_rejection() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=1, queue_timeout=5)
        order: list[str] = []
        release_a = asyncio.Event()

        async def a() -> None:
            async with adm.slot():
                order.append("a")
                await release_a.wait()

        async def b() -> None:
            async with adm.slot():
                order.append("b")

        ta = asyncio.create_task(a())
        await asyncio.sleep(0)
        tb = asyncio.create_task(b())
        await asyncio.sleep(0)
        assert (adm.active, adm.queued) == (1, 1)
        with pytest.raises(TooManyRequests) as info:
            async with adm.slot():
                pass
        assert info.value.status == 429 and info.value.retry_after >= 1
        release_a.set()
        await asyncio.gather(ta, tb)
        assert order == ["a", "b"] and (adm.active, adm.queued) == (0, 0)

    asyncio.run(scenario())


def test_cancelled_waiter_leaves_the_queue_and_timeout_is_429() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=4, queue_timeout=0.1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with adm.slot():
                await hold.wait()

        async def waiter() -> None:
            async with adm.slot():
                raise AssertionError("a cancelled waiter must never run")

        th = asyncio.create_task(holder())
        await asyncio.sleep(0)
        tw = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        assert adm.queued == 1
        tw.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tw
        assert adm.queued == 0
        with pytest.raises(TooManyRequests, match=r"waited 0\.1s"):
            async with adm.slot():
                pass
        hold.set()
        await th
        assert (adm.active, adm.queued) == (0, 0)

    asyncio.run(scenario())


def test_unlimited_by_default() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=0, max_queue=0, queue_timeout=1)
        async with adm.slot(), adm.slot(), adm.slot():
            assert adm.active == 3
        assert adm.active == 0

    asyncio.run(scenario())


def test_waiters_are_served_by_priority_then_arrival() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=8, queue_timeout=5)
        order: list[str] = []
        hold = asyncio.Event()

        async def holder() -> None:
            async with adm.slot():
                await hold.wait()

        async def waiter(name: str, priority: int) -> None:
            async with adm.slot(priority):
                order.append(name)

        tasks = [asyncio.create_task(holder())]
        for name, priority in [("b10", 10), ("c10", 10), ("a0", 0), ("d-5", -5), ("e0", 0)]:
            tasks.append(asyncio.create_task(waiter(name, priority)))
            await asyncio.sleep(0)
        assert adm.queued == 5
        hold.set()
        await asyncio.gather(*tasks)
        assert order == ["d-5", "a0", "e0", "b10", "c10"]
        assert (adm.active, adm.queued) == (0, 0)

    asyncio.run(scenario())


def test_a_full_queue_gives_a_better_priority_the_worst_waiters_place() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=2, queue_timeout=5)
        hold = asyncio.Event()
        served: list[str] = []

        async def holder() -> None:
            async with adm.slot():
                await hold.wait()

        async def waiter(name: str, priority: int) -> None:
            async with adm.slot(priority):
                served.append(name)

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        early = asyncio.create_task(waiter("batch-1", 10))
        late = asyncio.create_task(waiter("batch-2", 10))
        await asyncio.sleep(0)
        with pytest.raises(TooManyRequests):  # no better than the worst waiter: turned away
            async with adm.slot(10):
                pass
        urgent = asyncio.create_task(waiter("urgent", 0))
        await asyncio.sleep(0)
        with pytest.raises(TooManyRequests, match="better priority"):
            await late  # the latest of the worst priority lost its place
        assert adm.queued == 2 and adm.rejected == 2
        hold.set()
        await asyncio.gather(h, early, urgent)
        assert served == ["urgent", "batch-1"] and (adm.active, adm.queued) == (0, 0)

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def small_proxy(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    config = logs / "admission.yaml"
    config.write_text("admission: {max_concurrent: 1, max_queue: 1, queue_timeout: 10}\n")
    with running(
        start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config), name="admission")
    ) as proxy:
        yield proxy  # type: ignore[misc]


def test_proxy_answers_429_beyond_queue(small_proxy: Proxy, clean_sims: dict[str, Sim]) -> None:
    clean_sims["p0"].faults(stall_seconds=4.0, count=2)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(httpx.post(small_proxy.url + "/v1/completions", json=body, timeout=20))

    def admitted() -> tuple[int, int]:
        adm = small_proxy.stats()["admission"]
        return adm["active"], adm["queued"]

    threads = [threading.Thread(target=call) for _ in range(3)]
    for expected, t in zip([(1, 0), (1, 1), None], threads, strict=True):
        t.start()
        if expected is not None:  # one holds the slot, one waits, the third is turned away
            wait_for(lambda e=expected: admitted() == e)  # type: ignore[misc]
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429]
    [rejected] = [r for r in results if r.status_code == 429]
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "Too Many Requests"
    metrics = small_proxy.metrics()
    assert metrics.total("pdproxy_requests_total", status="429") >= 1
    assert metrics.total("pdproxy_admission_rejected_total") == metrics.total(
        "pdproxy_requests_total", status="429"
    )


def test_queued_client_that_leaves_is_dropped(
    small_proxy: Proxy, clean_sims: dict[str, Sim]
) -> None:
    p0 = clean_sims["p0"]
    p0.faults(stall_seconds=3.0, count=1)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    first = threading.Thread(
        target=httpx.post, args=(small_proxy.url + "/v1/completions",), kwargs={"json": body}
    )
    first.start()
    # The first holds the only slot (stalled on the prefiller) before the second arrives.
    wait_for(lambda: small_proxy.stats()["admission"]["active"] == 1)
    with pytest.raises(httpx.TimeoutException):  # queued behind the first; gives up
        httpx.post(small_proxy.url + "/v1/completions", json=body, timeout=0.3)
    wait_for(lambda: small_proxy.stats()["admission"]["queued"] == 0)
    first.join()
    wait_for(lambda: small_proxy.stats()["admission"]["active"] == 0)
    assert len(p0.generation_records()) == 1  # the one that left never reached an engine


@pytest.fixture(scope="module")
def queueing_proxy(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    config = logs / "admission-priority.yaml"
    config.write_text("admission: {max_concurrent: 1, max_queue: 8, queue_timeout: 20}\n")
    proxy = start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config),
                        name="admission-priority")  # fmt: skip
    with running(proxy):
        yield proxy


def admitted(proxy: Proxy) -> tuple[int, int]:
    adm = proxy.stats()["admission"]
    return adm["active"], adm["queued"]


def test_full_queue_serves_priority_0_before_earlier_priority_10(
    queueing_proxy: Proxy, clean_sims: dict[str, Sim]
) -> None:
    """Under overload, an interactive request (priority 0) is not queued behind the batch jobs
    (priority 10) that arrived before it; within one priority, first come first served."""
    p0 = clean_sims["p0"]
    p0.faults(stall_seconds=1.5, count=1)  # the first request holds the only slot a while
    proxy = queueing_proxy
    threads = []
    for rid, priority in [("first", 0), ("batch-a", 10), ("batch-b", 10), ("interactive", 0)]:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "priority": priority}
        thread = threading.Thread(target=httpx.post, args=(proxy.url + "/v1/completions",),
                                  kwargs={"json": body, "headers": {"X-Request-Id": rid},
                                          "timeout": 20})  # fmt: skip
        thread.start()
        threads.append(thread)
        queued = len(threads) - 1  # each arrives while the first still holds the slot
        wait_for(lambda q=queued: admitted(proxy) == (1, q))  # type: ignore[misc]
    for thread in threads:
        thread.join()
    order = [r["x_request_id"] for r in p0.generation_records()]
    assert order == ["first", "interactive", "batch-a", "batch-b"]


def test_a_batch_takes_one_slot_per_sub_request(
    queueing_proxy: Proxy, clean_sims: dict[str, Sim]
) -> None:
    """A fanned-out request counts as its sub-requests: with one slot, its three prompts run one
    after another, and a single request arriving meanwhile queues behind them at its priority."""
    p0 = clean_sims["p0"]
    p0.faults(stall_seconds=0.5, count=3)
    proxy = queueing_proxy
    batch = {"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2, "priority": 5}
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(httpx.post(
        proxy.url + "/v1/completions", json=batch, timeout=20)))  # fmt: skip
    thread.start()
    wait_for(lambda: admitted(proxy) == (1, 2))
    single = {"model": MODEL, "prompt": "d", "max_tokens": 2, "priority": 1}
    assert httpx.post(proxy.url + "/v1/completions", json=single, timeout=20).status_code == 200
    thread.join()
    assert result[0].status_code == 200 and len(result[0].json()["choices"]) == 3
    prompts = [r["body"]["prompt"] for r in p0.generation_records()]
    assert prompts[0] in "abc" and prompts[1] == "d"  # ahead of the batch's waiting prompts
