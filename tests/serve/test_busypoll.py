"""Busy polling (proxy.serve.busypoll, `--busy-poll SECONDS`): the serving process's loop polls
while requests are in flight and `linger` seconds after the last one, and sleeps otherwise."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.harness import cpu_seconds
from proxy.config import load_config
from proxy.serve.busypoll import BusyPoll, polling
from tests.conftest import MODEL, Proxy, Sim, start_proxy, start_sim


class Held:
    """An ASGI app whose HTTP requests wait until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.lifespans = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.lifespans += 1
            return
        await self.release.wait()


async def _polls_over(poll: BusyPoll, seconds: float) -> int:
    before = poll.polls
    await asyncio.sleep(seconds)
    return poll.polls - before


def test_the_loop_polls_while_a_request_is_in_flight_then_for_the_linger_then_sleeps() -> None:
    async def scenario() -> None:
        app = Held()
        poll = BusyPoll(app, linger=0.2)
        assert await _polls_over(poll, 0.05) == 0  # nothing in flight: the loop sleeps
        request = asyncio.create_task(poll({"type": "http"}, None, None))
        assert await _polls_over(poll, 0.1) > 20  # in flight: the loop comes round, no I/O
        app.release.set()
        await request
        assert poll.in_flight == 0
        assert await _polls_over(poll, 0.05) > 5  # within the linger
        await asyncio.sleep(0.25)
        assert await _polls_over(poll, 0.1) == 0  # the linger is over: asleep again

    asyncio.run(scenario())


def test_linger_zero_polls_only_while_in_flight_and_overlapping_requests_count() -> None:
    async def scenario() -> None:
        app = Held()
        poll = BusyPoll(app, linger=0.0)
        first = asyncio.create_task(poll({"type": "http"}, None, None))
        second = asyncio.create_task(poll({"type": "http"}, None, None))
        await asyncio.sleep(0.01)
        assert poll.in_flight == 2
        assert await _polls_over(poll, 0.05) > 5
        app.release.set()
        await asyncio.gather(first, second)
        await asyncio.sleep(0.01)
        assert await _polls_over(poll, 0.05) == 0

    asyncio.run(scenario())


def test_the_lifespan_passes_through_without_polling() -> None:
    async def scenario() -> None:
        app = Held()
        poll = BusyPoll(app, linger=1.0)
        await poll({"type": "lifespan"}, None, None)
        assert app.lifespans == 1
        assert await _polls_over(poll, 0.05) == 0

    asyncio.run(scenario())


def test_off_unless_configured() -> None:
    app = Held()
    assert polling(app, load_config(decode=["http://d"], prefill=["http://p"])) is app
    wrapped = polling(app, load_config(decode=["http://d"], prefill=["http://p"], busy_poll=0.5))
    assert isinstance(wrapped, BusyPoll) and wrapped.linger == 0.5


# -- the proxy's processes, as run -------------------------------------------------------------


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[dict[str, Sim]]:
    """A prefiller, and a decoder that stalls 1.5 s before each answer."""
    pre = start_sim(tmp_path, "p", "--speed-factor", "0.05", role="prefill")
    dec = start_sim(
        tmp_path, "d", "--speed-factor", "0.05", "--fault-stall-seconds", "1.5", role="decode"
    )
    try:
        yield {"p": pre, "d": dec}
    finally:
        pre.stop()
        dec.stop()


def _request(proxy: Proxy, done: list[int]) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=30) as resp:
        resp.read()
        done.append(resp.status_code)


def _cpu_in_flight_and_after(proxy: Proxy) -> tuple[float, float]:
    """The share of a core the proxy's processes used while one request waited on the stalled
    decoder, and over a second after it ended (past the linger): the proxy's process and its
    serving processes."""
    done: list[int] = []
    client = threading.Thread(target=_request, args=(proxy, done))
    client.start()
    time.sleep(0.3)
    t0, c0 = time.monotonic(), cpu_seconds(proxy.pid)
    time.sleep(1.0)
    in_flight = (cpu_seconds(proxy.pid) - c0) / (time.monotonic() - t0)
    client.join(30)
    assert done == [200]
    time.sleep(0.6)
    t0, c0 = time.monotonic(), cpu_seconds(proxy.pid)
    time.sleep(1.0)
    after = (cpu_seconds(proxy.pid) - c0) / (time.monotonic() - t0)
    return in_flight, after


@pytest.mark.parametrize("workers", [1, 2])
def test_the_serving_process_polls_while_a_request_waits_and_sleeps_after(
    tmp_path: Path, stalling: dict[str, Sim], workers: int
) -> None:
    proxy = start_proxy(
        tmp_path, [stalling["p"]], [stalling["d"]], "--busy-poll", "0.2", workers=workers
    )
    try:
        in_flight, after = _cpu_in_flight_and_after(proxy)
    finally:
        proxy.stop()
    assert in_flight > 0.4, f"a polling process used {in_flight:.2f} of a core"
    assert after < 0.2, f"{after:.2f} of a core once the linger was over"


def test_without_busy_poll_the_process_sleeps_while_a_request_waits(
    tmp_path: Path, stalling: dict[str, Sim]
) -> None:
    proxy = start_proxy(tmp_path, [stalling["p"]], [stalling["d"]])
    try:
        in_flight, _ = _cpu_in_flight_and_after(proxy)
    finally:
        proxy.stop()
    assert in_flight < 0.2, f"{in_flight:.2f} of a core"
