"""The KV-event subscriber on real ZMQ sockets, against the simulator's publisher: batches
applied once each and in order, gaps repaired by replay, entries dropped when the engine goes
away or a gap cannot be repaired, and rebuilt when it comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pdsim.kvevents import KvEventPublisher, KvEventsConfig, removed, stored
from pdsim.launch import free_port
from proxy.control.kvevents import Endpoints, KvEvents, Subscriber
from proxy.control.workers import Worker
from proxy.place.kvindex import KvIndex

URL = "http://127.0.0.1:1"
BLOCK = list(range(16))
PROMPT = [*BLOCK, *range(100, 117)]  # two full blocks, then one token


def publisher(port: int, replay: bool = True) -> KvEventPublisher:
    """Connects to the subscriber bound at `port` (vLLM's rule for an endpoint without a
    wildcard), and binds its replay socket."""
    return KvEventPublisher(
        KvEventsConfig(
            endpoint=f"tcp://127.0.0.1:{port}",
            replay_endpoint=f"tcp://127.0.0.1:{free_port()}" if replay else None,
        )
    )


def store_prompt(pub: KvEventPublisher, send: bool = True) -> None:
    pub.publish([stored([11], None, BLOCK, 16)], send)
    pub.publish([stored([12], 11, PROMPT[16:32], 16)], send)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - a condition of plain objects
            await asyncio.sleep(0.01)


def run(scenario: Callable[[KvEventPublisher, KvEvents, Worker], Awaitable[None]],
        replay: bool = True) -> None:  # fmt: skip
    async def main() -> None:
        port = free_port()
        pub = publisher(port, replay)
        events = KvEvents(KvIndex(), "", replay_timeout=2.0)
        worker = Worker("decode", "d0", URL)
        events.start(worker, Endpoints(f"tcp://127.0.0.1:{port}", pub.endpoints[1], bind=True))
        try:
            await scenario(pub, events, worker)
        finally:
            await events.close()
            await pub.close()

    asyncio.run(main())


def held(events: KvEvents) -> int:
    return events.index.cached(PROMPT, [URL]).get(URL, -1)


def subscriber(events: KvEvents) -> Subscriber:
    return events.running[URL][0]


def test_a_late_subscriber_catches_up_through_the_replay() -> None:
    async def scenario(pub: KvEventPublisher, events: KvEvents, worker: Worker) -> None:
        store_prompt(pub, send=False)  # before the subscriber could hear them
        await until(lambda: worker.prefix_source == "events")
        await until(lambda: held(events) == 32)  # replayed on connecting, nothing more sent
        sub = subscriber(events)
        assert sub.expected == 2 and sub.counts.repaired == 1
        await asyncio.sleep(0.2)  # the subscription is through
        pub.publish([removed([999])])  # batch 2: the first the subscriber hears
        await until(lambda: sub.expected == 3)
        assert held(events) == 32 and sub.counts.repaired == 1 and sub.counts.lost == 0

    run(scenario)


def test_a_gap_is_repaired_and_each_batch_applied_once() -> None:
    async def scenario(pub: KvEventPublisher, events: KvEvents, worker: Worker) -> None:
        await until(lambda: worker.prefix_source == "events")
        await asyncio.sleep(0.2)
        pub.publish([stored([11], None, BLOCK, 16)])
        await until(lambda: held(events) == 16)
        pub.publish([stored([12], 11, PROMPT[16:32], 16)], send=False)  # dropped
        pub.publish([stored([11], None, BLOCK, 16)])  # a second copy of block 11
        await until(lambda: subscriber(events).expected == 3)
        assert held(events) == 32
        pub.publish([removed([11])])  # one copy goes: the other still holds it
        await until(lambda: subscriber(events).expected == 4)
        assert held(events) == 32
        pub.publish([removed([11])])
        await until(lambda: held(events) == 0)

    run(scenario)


def test_without_replay_a_gap_drops_the_entries() -> None:
    async def scenario(pub: KvEventPublisher, events: KvEvents, worker: Worker) -> None:
        await until(lambda: worker.prefix_source == "events")
        await asyncio.sleep(0.2)
        pub.publish([stored([11], None, BLOCK, 16)])
        await until(lambda: held(events) == 16)
        pub.publish([removed([11])], send=False)  # missed: the index would claim block 11
        pub.publish([stored([21], None, PROMPT[16:32], 16)])
        await until(lambda: subscriber(events).expected == 3)
        assert held(events) == 0 and subscriber(events).counts.lost == 1
        assert events.index.cached(PROMPT[16:33], [URL]) == {URL: 16}

    run(scenario, replay=False)


def test_a_restarted_engine_loses_its_entries_and_is_rebuilt() -> None:
    async def scenario(pub: KvEventPublisher, events: KvEvents, worker: Worker) -> None:
        await until(lambda: worker.prefix_source == "events")
        await asyncio.sleep(0.2)
        store_prompt(pub)
        await until(lambda: held(events) == 32)
        endpoint = pub.endpoints[0]
        await pub.close()
        await until(lambda: URL not in events.index)  # disconnected: it keeps the estimate
        assert worker.prefix_source == "estimate"
        again = publisher(int(endpoint.rsplit(":", 1)[1]))
        try:
            await until(lambda: subscriber(events).counts.lost >= 1)
            await asyncio.sleep(0.5)  # reconnected (ZMQ retries every 100 ms)
            again.publish([stored([31], None, BLOCK, 16)])  # batch 0 of the new engine
            await until(lambda: held(events) == 16)
        finally:
            await again.close()

    run(scenario)
