"""The engines' load from their /metrics, and the one scraper that reads every engine once a
tick for every watch that is due (real sockets)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.control.workers import EngineLoad, Worker
from proxy.engines.client import EngineClient
from proxy.engines.promtext import Samples, parse
from proxy.engines.scrape import LOAD_METRICS, Scraper, Watch, engine_load, observe_load
from tests.fakes import LoggingEngine

SIM = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
"""
# vLLM's info gauge: every CacheConfig field as a label, and the engine
INFO = (
    b'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="%s",'
    b'engine="0",gpu_memory_utilization="0.9"} 1.0\n'
)


def load(text: bytes) -> EngineLoad | None:
    return engine_load(parse(text, LOAD_METRICS), 7)


def observe(worker: Worker, text: bytes | None) -> None:
    observe_load(worker, None if text is None else parse(text, LOAD_METRICS))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SIM, EngineLoad(5.0, 1.0, 0.5, 7)),  # summed over engines, KV usage the highest
        (b"vllm:num_requests_running 2\n", EngineLoad(2.0, 0.0, 0.0, 7)),
        (b"# nothing\nother_metric 1\n", None),
        (b'vllm:num_requests_running{a="b"} garbage\n', None),
        (b"", None),
        (SIM + INFO % b"False", EngineLoad(5.0, 1.0, 0.5, 7, prefix_caching=False)),
        (SIM + INFO % b"True", EngineLoad(5.0, 1.0, 0.5, 7, prefix_caching=True)),
        (SIM + b'vllm:cache_config_info{engine="0"} 1.0\n', EngineLoad(5.0, 1.0, 0.5, 7)),
    ],
)
def test_engine_load(text: bytes, expected: EngineLoad | None) -> None:
    assert load(text) == expected


def test_what_an_engine_says_of_its_prefix_cache_outlives_a_failed_scrape() -> None:
    worker = Worker("decode", "d0", "http://127.0.0.1:1")
    assert worker.caches_prefixes  # vLLM's default until the engine says otherwise
    observe(worker, SIM + INFO % b"False")
    assert worker.prefix_caching is False and not worker.caches_prefixes
    observe(worker, None)  # unreadable: the load goes, the engine's configuration stays
    assert worker.engine_load is None and not worker.caches_prefixes
    observe(worker, SIM)  # a scrape that does not say keeps what was said
    assert worker.prefix_caching is False


NIXL = (
    b"vllm:nixl_xfer_time_seconds_count 4\n"
    b"vllm:nixl_xfer_time_seconds_sum 0.5\n"
    b"vllm:nixl_bytes_transferred_sum 1e9\n"
)


class Seen:
    """What one watch was handed: (worker id, samples or None), in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Samples | None]] = []

    def __call__(self, worker: Worker, samples: Samples | None) -> None:
        self.calls.append((worker.id, samples))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_scrape_per_engine_per_tick_feeds_every_watch_that_is_due() -> None:
    async def scenario() -> None:
        async with LoggingEngine(SIM) as p0, LoggingEngine(SIM + NIXL) as d0:
            engine = EngineClient(1.0)
            await engine.start()
            workers = [Worker("prefill", "p0", p0.url), Worker("decode", "d0", d0.url)]
            load, kv, clock = Seen(), Seen(), Clock()
            watches = [
                Watch(LOAD_METRICS, load, interval=1.0, timeout=1.0),
                Watch(("vllm:nixl_xfer_time_seconds_count",), kv, 0.25, 1.0,
                      frozenset(("decode", "pool"))),
            ]  # fmt: skip
            scraper = Scraper(engine, lambda: workers, watches, clock)
            assert scraper.interval == 0.25  # the most frequent watch's
            for tick in range(8):
                clock.now = tick * 0.25
                await scraper.tick()
            await engine.close()
            # the decoder: one GET a tick, for both watches when both are due
            assert d0.log == ["/metrics"] * 8
            assert [who for who, _ in kv.calls] == ["d0"] * 8
            assert [who for who, _ in load.calls] == ["p0", "d0"] * 2
            shared = [s for who, s in load.calls if who == "d0"]
            assert all(any(s is k for _, k in kv.calls) for s in shared)  # one parse, both read
            # the prefiller: only the load watch looks at it, due every fourth tick
            assert p0.log == ["/metrics"] * 2
            d0_load = shared[0]
            assert d0_load is not None and engine_load(d0_load, 0) == EngineLoad(5, 1, 0.5, 0)

    asyncio.run(scenario())


def test_a_watch_is_told_unreadable_when_the_answer_overran_its_own_timeout() -> None:
    async def scenario() -> None:
        async with LoggingEngine(SIM + NIXL, delay=0.3) as d0:
            engine = EngineClient(1.0)
            await engine.start()
            worker = Worker("decode", "d0", d0.url)
            fast, patient = Seen(), Seen()
            scraper = Scraper(
                engine,
                lambda: [worker],
                [Watch(LOAD_METRICS, fast, 0.25, 0.1), Watch(LOAD_METRICS, patient, 5.0, 2.0)],
            )
            await scraper.tick()
            await engine.close()
            assert d0.log == ["/metrics"]  # one GET, waited for as long as the patient watch
            assert fast.calls == [("d0", None)]
            assert patient.calls[0][1] is not None

    asyncio.run(scenario())
