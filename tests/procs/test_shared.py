"""`pdproxy serve --workers 2` routes and admits as one process: the shared load table and the
global admission, as real processes on real sockets in front of slow simulated engines.

A request reaches the serving process that accepted its connection, so each test pins its
connections: an `Agent` opens connections until one is answered by the process it wants (the
X-Request-Id names it), keeps it alive (a GET of /health every second: the server closes a
connection idle for 5 s) and sends its requests on it when told. Deadlines are generous (the box
may be busy); what is asserted is where requests went and in which order, never how fast."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, Sim, start_sim, wait_for
from tests.procs.test_processes import BODY, alive, all_connected, process_of, processes, start

LONG = 400  # tokens: seconds of decoding on the slow engines (30 ms a token)
MID = 100
SHORT = 3
PIN = 1  # the tokens of the requests that pin a connection (not counted below)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[Sim, Sim, Sim]]:
    """A prefiller and two decoders that take 30 ms a token and never stop early."""
    args = ("--decode-base-ms", "30", "--eos-probability", "0")
    sims = (
        start_sim(tmp_path, "slow-p", *args, role="prefill"),
        start_sim(tmp_path, "slow-d0", *args, role="decode"),
        start_sim(tmp_path, "slow-d1", *args, role="decode"),
    )
    try:
        yield sims
    finally:
        for sim in sims:
            sim.stop()


class Agent:
    """One client connection, accepted by serving process `name` (any process when None), that
    sends its requests in a thread of its own once `send` is called (see the module's
    docstring). Each answer is kept as (status, process, monotonic time of its headers); a
    connection that dies is status 0."""

    def __init__(self, url: str, name: str | None) -> None:
        self.client = pin(url, name)
        self.answers: list[tuple[int, str, float]] = []
        self._go = threading.Event()
        self._body: dict[str, Any] = {}
        self._count = 1
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, body: dict[str, Any], count: int = 1) -> None:
        self._body, self._count = body, count
        self._go.set()

    def _run(self) -> None:
        try:
            while not self._go.wait(1):
                self.client.get("/health")
            for _ in range(self._count):
                with self.client.stream("POST", "/v1/completions", json=self._body) as resp:
                    seen = time.monotonic()
                    resp.read()
                    name = process_of(resp.headers.get("x-request-id", "pdp--"))
                    self.answers.append((resp.status_code, name, seen))
        except httpx.TransportError:  # its process died (or the proxy stopped)
            self.answers.append((0, "", time.monotonic()))
        finally:
            self.client.close()

    def done(self, timeout: float = 120) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._go.is_set() and self._thread.is_alive()

    @property
    def status(self) -> int:
        assert self.done(), "a request hung"
        return self.answers[-1][0]


def pin(url: str, name: str | None) -> httpx.Client:
    """A client whose one connection `name` accepted (each connection goes to the first process
    to accept it: try until one does, at most 500 times)."""
    for _ in range(500):
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        client = httpx.Client(base_url=url, timeout=180, limits=limits)
        resp = client.post("/v1/completions", json={**BODY, "max_tokens": PIN})
        assert resp.status_code == 200, resp.text
        if name is None or process_of(resp.headers["x-request-id"]) == name:
            return client
        client.close()
    raise AssertionError(f"no connection of 500 reached {name}")


def stream(max_tokens: int, priority: int = 0, prompt: str = BODY["prompt"]) -> dict[str, Any]:
    body = {**BODY, "max_tokens": max_tokens, "stream": True, "priority": priority}
    return {**body, "prompt": prompt}


# the long streams' prompt is longer than the short requests': a decoder with the same count of
# requests in flight but a short one among them is the less loaded (a short request's count may
# linger for a moment after its answer)
LONG_PROMPT = "tell me a long story " * 50


def decode_inflight(proxy: Proxy) -> int:
    """The requests in flight on the decoders, as /stats shows them (with serving processes:
    the load table's sums, as the control process reads them)."""
    return sum(int(w["inflight"]) for w in proxy.stats()["workers"]["decode"])


def skewed(proxy: Proxy, decoders: tuple[Sim, Sim], w1: str | None, w2: str | None) -> list[Any]:
    """Three long streams from process `w1`, then ten short requests one after another from
    process `w2` while the long ones run; per decoder: (long streams, short requests) it got."""
    longs = [Agent(proxy.url, w1) for _ in range(3)]
    short = Agent(proxy.url, w2)
    for sim in decoders:
        sim.reset()
    for placed, agent in enumerate(longs, 1):
        agent.send(stream(LONG, prompt=LONG_PROMPT))
        wait_for(lambda: decode_inflight(proxy) == placed, 60)  # noqa: B023 (one at a time)
    short.send({**BODY, "max_tokens": SHORT}, count=10)
    assert short.done(), "the short requests hung"
    assert all(agent.running for agent in longs), "the long streams ended before the short ones"
    for agent in (*longs, short):
        assert agent.done()
        assert all(status == 200 for status, _, _ in agent.answers), agent.answers
    if w1 is not None:  # each connection stayed with its process
        assert {name for agent in longs for _, name, _ in agent.answers} == {w1}
        assert {name for _, name, _ in short.answers} == {w2}
    return [
        tuple(
            sum(r["body"]["max_tokens"] == tokens for r in sim.generation_records())
            for tokens in (LONG, SHORT)
        )
        for sim in decoders
    ]


def test_two_processes_share_skewed_load_as_one_process_would(
    tmp_path: Path, slow: tuple[Sim, Sim, Sim]
) -> None:
    prefill, d0, d1 = slow
    args = ("--decode-policy", "least_loaded")
    one = start(tmp_path, [prefill], [d0, d1], *args, workers=1)
    try:
        alone = skewed(one, (d0, d1), None, None)
    finally:
        one.stop()
    two = start(tmp_path, [prefill], [d0, d1], *args)
    try:
        shared = skewed(two, (d0, d1), "w1", "w2")
    finally:
        two.stop()
    print(f"per decoder (long, short): one process {alone}, two processes {shared}")
    # one process: the long streams go 2 and 1, the short ones all to the decoder with 1
    assert sorted(alone) == [(1, 10), (2, 0)], alone
    # w2 sees w1's long streams: the short ones go to the decoder with fewer, as one process
    # sends them (blind to them, it would spread them over both decoders it thinks idle)
    assert sorted(shared) == sorted(alone), shared


@pytest.fixture
def admitting(tmp_path: Path, slow: tuple[Sim, Sim, Sim]) -> Iterator[Proxy]:
    """Two serving processes behind one global admission of 2 slots and a queue of 3."""
    config = tmp_path / "admission.yaml"
    config.write_text("admission: {max_concurrent: 2, max_queue: 3, queue_timeout: 170}\n")
    prefill, d0, _ = slow
    proxy = start(tmp_path, [prefill], [d0], "--config", str(config))
    try:
        yield proxy
    finally:
        proxy.stop()


class Peak:
    """The most requests seen at once on an engine and in the proxy's admission (polled)."""

    def __init__(self, proxy: Proxy, engine: Sim) -> None:
        self.engine = self.admitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(proxy, engine), daemon=True)
        self._thread.start()

    def _run(self, proxy: Proxy, engine: Sim) -> None:
        while not self._stop.wait(0.05):
            self.engine = max(self.engine, int(engine.control("GET", "info")["running"]))
            self.admitted = max(self.admitted, int(proxy.stats()["admission"]["active"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def admission(proxy: Proxy) -> dict[str, int]:
    found: dict[str, int] = proxy.stats()["admission"]
    return found


def test_max_concurrent_holds_for_both_processes_and_their_queue_is_one(
    admitting: Proxy, slow: tuple[Sim, Sim, Sim]
) -> None:
    proxy, decoder = admitting, slow[1]
    holders = [Agent(proxy.url, "w1"), Agent(proxy.url, "w2")]
    a, c = (Agent(proxy.url, "w1") for _ in range(2))
    b, d, e = (Agent(proxy.url, "w2") for _ in range(3))
    peak = Peak(proxy, decoder)
    try:
        holders[0].send(stream(LONG))
        wait_for(lambda: admission(proxy)["active"] == 1, 60)
        time.sleep(1)  # the first holder ends first: the first slot freed is its
        holders[1].send(stream(LONG))
        wait_for(lambda: admission(proxy)["active"] == 2, 60)
        for queued, (agent, priority) in enumerate(((a, 5), (b, 1), (c, 3)), 1):
            agent.send(stream(MID, priority))  # each waits: both processes' queue is one
            wait_for(lambda: admission(proxy)["queued"] == queued, 60)  # noqa: B023
        d.send(stream(MID, 9))  # the queue is full and nobody waiting is worse: 429
        assert d.status == 429
        e.send(stream(MID, 0))  # better than the worst waiter (a): takes its place
        assert a.status == 429
        wait_for(lambda: admission(proxy) == {"active": 2, "queued": 3, "rejected": 2}, 60)
        for agent in (*holders, b, c, e):
            assert agent.status == 200, agent.answers
    finally:
        peak.stop()
    print(f"at most {peak.engine} on the engine, {peak.admitted} admitted")
    assert peak.engine <= 2 and peak.admitted <= 2
    order = sorted((e, b, c), key=lambda agent: agent.answers[-1][2])
    assert order == [e, b, c]  # served by priority across the processes (0, 1, 3)
    assert {name for agent in (e, b, c) for _, name, _ in agent.answers} == {"w1", "w2"}
    wait_for(lambda: admission(proxy)["active"] == 0, 30)


def test_a_serving_process_killed_under_load_frees_its_admission_slots(
    admitting: Proxy,
) -> None:
    proxy = admitting
    holders = [Agent(proxy.url, "w1") for _ in range(2)]
    waiters = [Agent(proxy.url, "w2") for _ in range(2)]
    for agent in holders:
        agent.send(stream(LONG))
    wait_for(lambda: admission(proxy)["active"] == 2, 60)
    for agent in waiters:
        agent.send(stream(SHORT))
    wait_for(lambda: admission(proxy)["queued"] == 2, 60)
    victim = next(p for p in processes(proxy) if p["name"] == "w1")
    os.kill(victim["pid"], signal.SIGKILL)
    # its slots go to w2's waiters at once, long before their queue_timeout (170 s)
    assert all(agent.done(90) for agent in waiters), "w2's waiters still wait"
    assert [agent.status for agent in waiters] == [200, 200]
    assert [agent.status for agent in holders] == [0, 0]  # their connections died with w1
    assert not alive(victim["pid"])
    wait_for(lambda: admission(proxy) == {"active": 0, "queued": 0, "rejected": 0}, 30)
    wait_for(lambda: decode_inflight(proxy) == 0, 30)  # its column of the load table went too
    wait_for(lambda: all_connected(proxy) and processes(proxy)[0]["restarts"] == 1, 60)
    pin(proxy.url, "w1").close()  # the replacement serves
