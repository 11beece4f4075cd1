"""Admission control: unit behaviour of the slot queue, then through the proxy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.admission import Admission
from proxy.errors import TooManyRequests
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
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert small_proxy.metrics().total("pdproxy_requests_total", status="429") >= 1


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
