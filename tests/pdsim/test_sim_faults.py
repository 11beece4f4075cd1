"""Client disconnects and injected faults."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from sim_helpers import config, metrics, post, run_with, stream_events

from pdsim import SimServer, Timing

SLOW = Timing(speed_factor=1.0)
REQ = {"prompt": "the river and the sea", "max_tokens": 500, "stream": True}


def test_disconnect_mid_stream_aborts() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        srv = servers[0]
        async with s.post(srv.url + "/v1/completions", json=REQ) as resp:
            await resp.content.readline()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if srv.engine.num_running == 0:
                break
        m = await metrics(s, srv)
        assert m['pdsim:aborted_requests_total{phase="decode"}'] == 1
        assert m["vllm:num_requests_running"] == 0 and srv.engine.pool.used_blocks == 0
        async with s.get(srv.url + "/_sim/requests") as r:
            assert (await r.json())["requests"][-1]["outcome"] == "aborted"

    run_with([config(timing=SLOW)], body)


def test_disconnect_during_prefill_aborts() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        srv = servers[0]
        prompt = "word " * 8000
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                post(s, srv.url + "/v1/completions", {"prompt": prompt, "max_tokens": 2}), 0.1
            )
        await asyncio.sleep(0.3)
        m = await metrics(s, srv)
        assert m['pdsim:aborted_requests_total{phase="prefill"}'] == 1
        assert srv.engine.pool.used_blocks == 0

    run_with([config(timing=SLOW, max_num_batched_tokens=512)], body)


def test_fault_switches() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        srv = servers[0]
        url = srv.url + "/v1/completions"
        ok = {"prompt": "the sea", "max_tokens": 5}

        await post(s, srv.url + "/_sim/faults", {"error_status": 503, "count": 2})
        assert (await post(s, url, ok))[0] == 503
        st, r = await post(s, url, ok)
        assert st == 503 and r["error"]["code"] == 503
        assert (await post(s, url, ok))[0] == 200

        await post(s, srv.url + "/_sim/faults", {"unhealthy": True})
        async with s.get(srv.url + "/health") as resp:
            assert resp.status == 503

        await post(s, srv.url + "/_sim/faults", {"stall_seconds": 0.3, "count": 1})
        t0 = asyncio.get_running_loop().time()
        await post(s, url, ok)
        assert asyncio.get_running_loop().time() - t0 >= 0.3

        await post(s, srv.url + "/_sim/faults", {"error_event_after_chunks": 2})
        ev = await stream_events(s, url, {**ok, "stream": True})
        assert "error" in ev[2] and ev[-1] == "[DONE]" and len(ev) == 4

        await post(s, srv.url + "/_sim/faults", {"drop_after_chunks": 2})
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream_events(s, url, {**ok, "stream": True})

        await post(s, srv.url + "/_sim/faults", {"garbage_body": True})
        st, raw = await post(s, url, ok)
        assert st == 200 and isinstance(raw, bytes)

        await post(s, srv.url + "/_sim/faults", {"truncate_body": True})
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(s, url, ok)

        st, r = await post(s, srv.url + "/_sim/faults", {"bogus": 1})
        assert st == 400
        await post(s, srv.url + "/_sim/reset", {})
        assert (await post(s, url, ok))[0] == 200
        async with s.get(srv.url + "/_sim/requests") as resp:
            assert len((await resp.json())["requests"]) == 1
        m = await metrics(s, srv)
        assert m['pdsim:aborted_requests_total{phase="decode"}'] == 0

    run_with([config()], body)
