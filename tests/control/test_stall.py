"""The stall watch: a prefiller (or decoder) that stops completing requests while its /health
stays 200 is taken out of rotation within `health.stall_timeout`; its waiting requests go to
another prefiller, to the decoder's own prefill, or end with a clear error; it comes back after
a trial request succeeds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from proxy.control.stall import WORK, StallWatch
from proxy.control.workers import Breaker, Worker, WorkerPool
from proxy.engines.promtext import Samples, parse
from proxy.errors import UpstreamTimeout
from tests.conftest import MODEL, Proxy, Sim, running, start_proxy, wait_for
from tests.flow.rig import WIRES, Engines, LMCacheSetup, start_topology

BODY = {"model": MODEL, "prompt": "a prompt for a wedged engine", "max_tokens": 4}
WEDGED = {"stall_seconds": 600}  # every generation request hangs; /health stays 200


def test_a_quiet_worker_is_tripped_and_its_waiting_legs_end_with_a_timeout() -> None:
    async def main() -> None:
        pool = WorkerPool("prefill")
        busy, quiet = Worker("prefill", "p0", "http://p0"), Worker("prefill", "p1", "http://p1")
        pool.add(busy)
        pool.add(quiet)
        watch = StallWatch(lambda: [pool], timeout=5.0)
        outcomes: list[str] = []

        async def leg(worker: Worker) -> None:
            with pool.track(worker, 10) as lease:
                try:
                    async with lease.wait():
                        await asyncio.sleep(60)
                except UpstreamTimeout as exc:
                    outcomes.append(exc.message)

        legs = [asyncio.create_task(leg(w)) for w in (busy, quiet, quiet)]
        await asyncio.sleep(0)
        assert len(quiet.waiting) == 2 and len(busy.waiting) == 1
        now = time.perf_counter()
        busy.last_progress = now + 4  # completed something 1 s before the check
        assert watch.check(now + 4.9) == []  # 4.9 s quiet: not yet
        assert watch.check(now + 5.1) == [quiet]
        await asyncio.wait(legs[1:], timeout=1)
        assert len(outcomes) == 2 and "p1 stopped completing requests" in outcomes[0]
        assert quiet.breaker is Breaker.OPEN and not quiet.available and quiet.stalls_total == 1
        assert busy.breaker is Breaker.CLOSED and not legs[0].done()
        legs[0].cancel()

    asyncio.run(main())


def test_progress_resets_the_clock_and_a_worker_with_nothing_waiting_is_never_quiet() -> None:
    async def main() -> None:
        pool = WorkerPool("decode")
        worker = Worker("decode", "d0", "http://d0")
        pool.add(worker)
        watch = StallWatch(lambda: [pool], timeout=1.0)
        assert watch.quiet(worker, time.perf_counter() + 100) == 0.0
        with pool.track(worker, 1) as lease:
            async with lease.wait():
                pass  # a completed leg is progress
        assert worker.last_progress > 0 and not worker.waiting

    asyncio.run(main())


def test_an_engine_whose_work_counters_rise_is_slow_not_wedged() -> None:
    """A starved engine completes nothing the proxy sent for longer than the timeout while its
    engine steps go on (its token counters rise): not tripped. Counters that stand still, or
    an engine whose /metrics cannot be read, prove nothing."""

    async def main() -> None:
        pool = WorkerPool("prefill")
        worker = Worker("prefill", "p0", "http://p0")
        pool.add(worker)
        clock = [100.0]
        watch = StallWatch(lambda: [pool], timeout=5.0, clock=lambda: clock[0])
        scrape = watch.watch(1.0, 1.0)
        assert scrape.names == WORK

        def counters(prompt: float, generated: float) -> Samples:
            text = f"vllm:prompt_tokens_total {prompt}\nvllm:generation_tokens_total {generated}\n"
            return parse(text.encode(), WORK)

        with pool.track(worker, 10) as lease:
            async with lease.wait():
                worker.last_progress = 0.0
                for wait in worker.waiting:
                    wait.started = 100.0
                scrape.observe(worker, counters(90, 10))  # the first read: a baseline only
                assert worker.last_progress == 0.0
                clock[0] = 104.0
                scrape.observe(worker, counters(90, 14))  # it generated tokens for others
                assert worker.last_progress == 104.0
                assert watch.check(108.0) == []  # 8 s since the leg began, 4 s since work
                clock[0] = 107.0
                scrape.observe(worker, counters(90, 14))  # standing still
                scrape.observe(worker, None)  # unreadable
                scrape.observe(worker, parse(b"vllm:other 1\n", WORK))  # not published
                assert worker.last_progress == 104.0 and worker.engine_work == 104
                assert watch.check(109.5) == [worker]
                assert worker.breaker is Breaker.OPEN

    asyncio.run(main())


def config(tmp: Path, **failover: object) -> str:
    path = tmp / f"stall-{len(list(tmp.glob('stall-*.yaml')))}.yaml"
    lines = [
        "health: {interval: 0.2, timeout: 1, cooldown: 1, stall_timeout: 1.5}",
        "timeouts: {prefill: 600}",
    ]
    if failover:
        lines.append("failover: {" + ", ".join(f"{k}: {v}" for k, v in failover.items()) + "}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def prefiller(proxy: Proxy, worker_id: str) -> dict[str, object]:
    return next(w for w in proxy.stats()["workers"]["prefill"] if w["id"] == worker_id)


def test_a_wedged_prefiller_with_a_green_health_is_taken_out_and_no_request_is_lost(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, p1, d0 = clean_sims["p0"], clean_sims["p1"], clean_sims["d0"]
    with running(start_proxy(tmp_path, [p0, p1], [d0], "--config", config(tmp_path))) as proxy:
        wait_for(lambda: all(w["available"] for w in proxy.stats()["workers"]["prefill"]))
        p0.faults(**WEDGED)
        assert httpx.get(p0.url + "/health").status_code == 200
        started = time.monotonic()
        with httpx.Client(timeout=30) as client:
            answers = [client.post(proxy.url + "/v1/completions", json=BODY) for _ in range(4)]
        assert [r.status_code for r in answers] == [200] * 4
        assert time.monotonic() - started < 15  # not the 600 s prefill deadline
        stalled = prefiller(proxy, "p0")
        assert stalled["stalls_total"] == 1 and stalled["breaker"] != "closed"
        assert "stopped completing requests" in str(stalled["last_error"])
        assert len(p1.generation_records()) >= 4  # every request was prefilled on p1 in the end
        assert "stopped completing requests" in proxy.log.read_text()
        # it comes back only after a trial request succeeds
        p0.faults()
        wait_for(lambda: prefiller(proxy, "p0")["breaker"] == "half_open")
        for _ in range(4):
            assert httpx.post(proxy.url + "/v1/completions", json=BODY).status_code == 200
        wait_for(lambda: prefiller(proxy, "p0")["breaker"] == "closed")


@pytest.mark.parametrize("fallback", [True, False])
def test_a_lone_wedged_prefiller_falls_back_to_the_decoder_or_ends_in_a_clear_error(
    tmp_path: Path, clean_sims: dict[str, Sim], fallback: bool
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    cfg = config(tmp_path, fallback_local_prefill=str(fallback).lower())
    with running(start_proxy(tmp_path, [p0], [d0], "--config", cfg)) as proxy:
        wait_for(lambda: prefiller(proxy, "p0")["available"])
        p0.faults(**WEDGED)
        resp = httpx.post(proxy.url + "/v1/completions", json=BODY, timeout=30)
        if fallback:
            assert resp.status_code == 200
            assert [r["kv"] for r in d0.generation_records()] == ["local"]
        else:
            assert resp.status_code == 504
            message = resp.json()["error"]["message"]
            assert "prefill worker" in message and "stopped completing requests" in message


def test_a_decoder_that_stops_producing_is_taken_out_and_its_streams_start_elsewhere(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0, d1 = clean_sims["p0"], clean_sims["d0"], clean_sims["d1"]
    cfg = config(tmp_path)
    with running(start_proxy(tmp_path, [p0], [d0, d1], "--config", cfg)) as proxy:
        wait_for(lambda: all(w["available"] for w in proxy.stats()["workers"]["decode"]))
        d0.faults(**WEDGED)
        with httpx.Client(timeout=30) as client:
            answers = [
                client.post(proxy.url + "/v1/completions", json={**BODY, "stream": True})
                for _ in range(3)
            ]
        assert [r.status_code for r in answers] == [200] * 3
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in answers)
        [stalled] = [w for w in proxy.stats()["workers"]["decode"] if w["id"] == "d0"]
        assert stalled["stalls_total"] == 1 and not stalled["available"]


def test_a_prefiller_wedged_by_a_full_lmcache_buffer_is_taken_out_and_no_request_is_lost(
    logs: Path,
) -> None:
    """LMCache 0.5.0's wedge, as the simulator models it: with the launcher's old decoder
    setting (skip_last_n_tokens 1) every request leaves one page of the decoder's receive buffer
    behind; once the buffer is full a push waits forever and sends no notification (the proxy
    lets the decoder recompute those), the blocked pushes keep the prefiller's staging pages,
    and once those are gone its engine blocks in its save and completes nothing while /health
    stays 200. The proxy ends the wait, takes the
    prefiller out, and the decoder computes the prompts itself: every request is answered."""
    setup = LMCacheSetup(
        sender_args=("--lmcache-buffer-chunks", "16"),  # the prefiller's staging buffer
        receiver_args=("--lmcache-buffer-chunks", "12", "--lmcache-skip-last-n-tokens", "1"),
        proxy_options=", on_timeout: fallback",
    )
    engines = Engines(logs, WIRES["lmcache"])
    topo = start_topology(engines, "wedge", config=config_lines(), own_prefillers=1, lmcache=setup)
    try:
        [p0], [d0] = topo.prefill, topo.decode
        started = time.monotonic()
        with httpx.Client(timeout=60) as client:
            codes = [
                client.post(
                    topo.url + "/v1/completions",
                    json={**BODY, "prompt": f"request {i} of the sustained load"},
                ).status_code
                for i in range(16)
            ]
        assert codes == [200] * 16, codes
        took = time.monotonic() - started
        assert took < 45, took  # no request waited out a prefill deadline
        assert httpx.get(p0.url + "/health").status_code == 200  # green all along
        [stalled] = topo.proxy.stats()["workers"]["prefill"]
        assert stalled["stalls_total"] >= 1 and stalled["breaker"] != "closed", stalled
        kinds = [r["kv"] for r in d0.generation_records()]
        assert kinds.count("pulled") >= 1 and len(kinds) == 16  # the pushed KV first, then local
    finally:
        topo.stop()
        engines.stop()


def config_lines() -> str:
    return "health: {interval: 0.2, timeout: 1, cooldown: 30, stall_timeout: 1.5}\n"
