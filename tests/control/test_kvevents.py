"""The KV-event subscriber on real ZMQ sockets, against the simulator's publisher: batches
applied once each and in order, gaps repaired by replay, entries dropped when the engine goes
away or a gap cannot be repaired, and rebuilt when it comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from pdsim.kvevents import KvEventPublisher, KvEventsConfig, removed, stored
from pdsim.launch import free_port
from proxy.control.kvevents import Endpoints, KvEvents, Subscriber
from proxy.control.workers import Worker
from proxy.engines.kvevents_wire import Event, EventBatch, encode_batch, seq_bytes
from proxy.place.kvindex import KvIndex

URL = "http://127.0.0.1:1"
BLOCK = list(range(16))
PROMPT = [*BLOCK, *range(100, 117)]  # two full blocks, then one token


def publisher(port: int, replay: bool = True, topic_frame: bool = True) -> KvEventPublisher:
    """Connects to the subscriber bound at `port` (vLLM's rule for an endpoint without a
    wildcard), and binds its replay socket (answering as vLLM 0.32, or as 0.24 without the
    topic frame)."""
    return KvEventPublisher(
        KvEventsConfig(
            endpoint=f"tcp://127.0.0.1:{port}",
            replay_endpoint=f"tcp://127.0.0.1:{free_port()}" if replay else None,
            replay_topic_frame=topic_frame,
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
        replay: bool = True, topic_frame: bool = True) -> None:  # fmt: skip
    async def main() -> None:
        port = free_port()
        pub = publisher(port, replay, topic_frame)
        events = KvEvents(KvIndex(), "", replay_timeout=2.0)
        worker = Worker("decode", "d0", URL)
        events.start(worker, Endpoints(f"tcp://127.0.0.1:{port}", pub.endpoints[1], bind=True))
        try:
            await scenario(pub, events, worker)
        finally:
            await events.close()
            await pub.close()

    asyncio.run(main())


def held(events: KvEvents | KvIndex) -> int:
    index = events if isinstance(events, KvIndex) else events.index
    return index.cached(PROMPT, [URL]).get(URL, -1)


def subscriber(events: KvEvents) -> Subscriber:
    return events.running[URL][0]


async def catch_up_then_follow(pub: KvEventPublisher, events: KvEvents, worker: Worker) -> None:
    store_prompt(pub, send=False)  # before the subscriber could hear them
    await until(lambda: worker.prefix_source == "events")
    await until(lambda: held(events) == 32)  # replayed on connecting, nothing more sent
    sub = subscriber(events)
    assert sub.expected == 2 and sub.counts.repaired == 1
    await asyncio.sleep(0.2)  # the subscription is through
    pub.publish([removed([999])])  # batch 2: the first the subscriber hears
    await until(lambda: sub.expected == 3)
    assert held(events) == 32 and sub.counts.repaired == 1 and sub.counts.lost == 0
    assert worker.prefix_source == "events"


def test_a_late_subscriber_catches_up_through_the_replay() -> None:
    run(catch_up_then_follow)


def test_the_replay_of_vllm_0_24_without_the_topic_frame_is_read_too() -> None:
    """vLLM 0.24 answers a replay with ["", seq, batch]: read as 0.32's frames, the first
    catch-up ended the subscriber and the engine stayed on the estimate (seen on an H200)."""
    run(catch_up_then_follow, topic_frame=False)


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


def test_a_batch_of_an_engine_that_left_does_not_hold_back_the_restarted_one() -> None:
    """The last batch of an engine can be read after its connection went. It must not set
    the numbers the restarted engine (counting from 0 again) is held to: once a real engine
    restarted, its first batches were taken for duplicates of the old one's and dropped."""

    async def main() -> None:
        context = zmq.asyncio.Context()
        worker = Worker("decode", "d0", URL)
        sub = Subscriber(worker, Endpoints("tcp://127.0.0.1:1", None, bind=True),
                         KvIndex(), context, "", 1.0)  # fmt: skip

        def batch(seq: int, *events: Event) -> list[bytes]:
            return [b"", seq_bytes(seq), encode_batch(EventBatch(ts=0.0, events=list(events)))]

        sub.on_monitor({"event": zmq.EVENT_ACCEPTED})
        await sub.on_message(batch(0, stored([11], None, BLOCK, 16)))
        sub.on_monitor({"event": zmq.EVENT_DISCONNECTED})
        await sub.on_message(batch(7, removed([11])))  # read after the engine left
        assert sub.counts.stale == 1 and held(sub.index) == -1
        sub.on_monitor({"event": zmq.EVENT_ACCEPTED})  # the engine is back, numbering from 0
        await sub.on_message(batch(0, stored([11], None, BLOCK, 16)))
        await sub.on_message(batch(1, stored([12], 11, PROMPT[16:32], 16)))
        assert held(sub.index) == 32 and sub.expected == 2 and sub.counts.duplicates == 0
        context.term()

    asyncio.run(main())
