"""The LMCache receive buffer as LMCache 0.5.0 keeps it: one-chunk pages reserved on push and
freed only when a request retrieves its chunks. With the launcher's decoder setting
(skip_last_n_tokens 1) the last pushed chunk of each request is never retrieved, the buffer
fills one page per request, and the prefiller then stops completing requests while /health
stays 200; with skip_last_n_tokens 0 every chunk is retrieved and the buffer drains."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec
import pytest
from sim_helpers import FAST, config, notification_socket, post, run_with
from sim_helpers import metrics as labelled_metrics

from pdsim import SimServer, Timing
from pdsim.lmcache.buffer import PageBuffer
from pdsim.lmcache.cli import add_arguments, config_from_args
from pdsim.lmcache.config import LMCacheSimConfig
from tests.conftest import free_port

CHUNK = 4  # tokens per chunk
PROMPT_TOKENS = 10  # chunks of 4, 4 and 2: three pages per request
PAGES = 6  # the decoder's receive buffer
STAGING = 6  # the prefiller's staging buffer


async def metrics(s: aiohttp.ClientSession, server: SimServer) -> dict[str, float]:
    """The sim's metrics; a sample without labels under its bare name."""
    return {k.removesuffix("{}"): v for k, v in (await labelled_metrics(s, server)).items()}


def prompt(i: int, tokens: int = PROMPT_TOKENS) -> list[int]:
    """Request i's prompt as token ids: its own first token, so no chunk is shared."""
    return [100 + i, *(200 + t % 500 for t in range(tokens - 1))]


def buffer_configs(skip: int, timing: Timing = FAST) -> tuple[list[Any], int]:
    notify = free_port()
    chunk_bytes = LMCacheSimConfig("sender", chunk_size=CHUNK).chunk_bytes
    sender = LMCacheSimConfig(
        "sender", chunk_size=CHUNK, proxy_port=notify, buffer_size=STAGING * chunk_bytes
    )
    receiver = LMCacheSimConfig(
        "receiver",
        chunk_size=CHUNK,
        init_ports=(free_port(),),
        alloc_ports=(free_port(),),
        buffer_size=PAGES * chunk_bytes,
        skip_last_n_tokens=skip,
    )
    return [config(lmcache=sender, timing=timing), config(lmcache=receiver)], notify


class Pair:
    """A sender and a receiver, and the proxy's side of it: the notification socket."""

    def __init__(self, servers: list[SimServer], s: aiohttp.ClientSession, sock: Any) -> None:
        self.p, self.d = servers
        self.s = s
        self.sock = sock

    def leg(self, i: int, tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
        lm = self.d.config.lmcache
        assert lm is not None
        spec = {
            "req_id": f"req-{i}",
            "receiver_host": "127.0.0.1",
            "receiver_init_port": list(lm.init_ports),
            "receiver_alloc_port": list(lm.alloc_ports),
        }
        kv = {"ret_first_tok": True, "disagg_spec": spec}
        return {"prompt": prompt(i, tokens), "max_tokens": 1, "kv_transfer_params": kv}

    async def prefill(self, i: int, timeout: float = 1.0, tokens: int = PROMPT_TOKENS) -> bool:
        """Whether the prefiller answered request i's prefill leg within `timeout`."""
        leg = self.leg(i, tokens)
        try:
            async with asyncio.timeout(timeout):
                status, _ = await post(self.s, self.p.url + "/v1/completions", leg)
        except TimeoutError:
            return False
        assert status == 200
        return True

    async def notified(self, timeout: float = 0.5) -> set[int]:
        """The requests whose ProxyNotif arrived: the first within `timeout`, the rest right
        after it."""
        out: set[int] = set()
        try:
            while True:
                raw = await asyncio.wait_for(self.sock.recv(), timeout)
                out.add(int(msgspec.msgpack.decode(raw)["req_id"].removeprefix("req-")))
                timeout = 0.05
        except TimeoutError:
            return out

    async def decode(self, i: int, tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
        body = {"prompt": prompt(i, tokens), "max_tokens": 2}
        status, out = await post(self.s, self.d.url + "/v1/completions", body)
        assert status == 200
        return dict(out)

    async def gauge(self, server: SimServer, name: str) -> float:
        return (await metrics(self.s, server))[f'pdsim:lmcache_{name}{{rank="0"}}']

    async def health(self, server: SimServer) -> int:
        async with self.s.get(server.url + "/health") as resp:
            return resp.status


def run_pair(skip: int, body: Any, timing: Timing = FAST, allocation_timeout: float = 0) -> None:
    """Run ``body`` on a sender and a receiver (whose pushes wait ``allocation_timeout``
    seconds for pages: forever when 0)."""
    configs, notify = buffer_configs(skip, timing)
    if allocation_timeout:
        configs[1].lmcache = replace(configs[1].lmcache, allocation_timeout=allocation_timeout)

    async def with_pull(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        async with notification_socket(notify) as sock:
            await body(Pair(servers, s, sock))

    run_with(configs, with_pull)


@pytest.mark.parametrize("timing", [FAST, Timing(speed_factor=0.05)], ids=["untimed", "timed"])
def test_the_leak_fills_the_buffer_and_wedges_the_prefiller_while_health_stays_200(
    timing: Timing,
) -> None:
    """Each request leaks its last page, so request 5 finds 2 free pages of the 3 it needs: its
    push waits (no notification), as does request 6's; their staged copies fill the
    prefiller's staging buffer, and request 7's save stops the prefiller's engine (its step
    loop when timed)."""

    async def body(pair: Pair) -> None:
        assert await pair.gauge(pair.d, "buffer_chunks") == PAGES
        outcomes = []
        for i in range(1, 9):
            if not await pair.prefill(i):
                outcomes.append((i, "no response"))
                break
            if i not in await pair.notified():
                outcomes.append((i, "no notification"))  # the proxy would answer 504
                continue
            out = await pair.decode(i)
            assert out["usage"]["prompt_tokens"] == PROMPT_TOKENS
            outcomes.append((i, "served"))
            assert await pair.gauge(pair.d, "buffer_used_chunks") == i  # one page leaked each
        assert outcomes == [
            *((i, "served") for i in range(1, 5)),
            (5, "no notification"),
            (6, "no notification"),
            (7, "no response"),
        ]
        m = await metrics(pair.s, pair.d)
        assert m["pdsim:lmcache_loaded_tokens_total"] == 4 * 8  # whole chunks below 9 tokens
        assert m["pdsim:lmcache_retrieved_chunks_total"] == 4 * 2
        assert await pair.gauge(pair.d, "buffer_used_chunks") == PAGES
        assert await pair.gauge(pair.d, "buffer_waiting") == 2
        assert await pair.gauge(pair.p, "staging_used_chunks") == STAGING
        assert await pair.gauge(pair.p, "staging_waiting") == 1
        # wedged: nothing completes any more, not even a request without KV transfer
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await post(pair.s, pair.p.url + "/v1/completions", {"prompt": "hi"})
        assert await pair.health(pair.p) == 200
        assert await pair.health(pair.d) == 200

    run_pair(1, body, timing)


def test_the_launchers_sizes_stop_where_issue_23_saw_the_real_pair_stop() -> None:
    """Chunks of 256 tokens, the launcher's 2 GiB receive buffer (64 chunks) and 1 GiB staging
    buffer (32), skip_last_n_tokens 1: after 29 single requests, seed requests of 7500 tokens
    (30 chunks) 0-5 are served, request 6 is answered but never notified, and request 7 gets
    no answer: what the GPU run recorded."""
    notify = free_port()
    sender = LMCacheSimConfig("sender", proxy_port=notify)
    receiver = LMCacheSimConfig("receiver", init_ports=(free_port(),), alloc_ports=(free_port(),))
    configs = [config(lmcache=sender), config(lmcache=receiver)]

    async def body(pair: Pair) -> None:
        assert await pair.gauge(pair.d, "buffer_chunks") == 64
        assert await pair.gauge(pair.p, "staging_chunks") == 32
        for i, tokens in enumerate([2000, 7500] * 14 + [2000]):  # the 29 single requests
            assert await pair.prefill(i, tokens=tokens) and await pair.notified() == {i}
            assert (await pair.decode(i, tokens))["usage"]["prompt_tokens"] == tokens
        assert await pair.gauge(pair.d, "buffer_used_chunks") == 29
        outcomes = []
        for k in range(8):
            i = 100 + k
            if not await pair.prefill(i, tokens=7500):
                outcomes.append("no response")
                break
            if i not in await pair.notified():
                outcomes.append("no notification")
                continue
            await pair.decode(i, 7500)
            outcomes.append("served")
        assert outcomes == ["served"] * 6 + ["no notification", "no response"]
        m = await metrics(pair.s, pair.d)
        assert m["pdsim:lmcache_loaded_tokens_total"] == 15 * 1792 + 20 * 7424

    async def with_pull(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        async with notification_socket(notify) as sock:
            await body(Pair(servers, s, sock))

    run_with(configs, with_pull)


def test_with_skip_0_every_chunk_is_retrieved_and_the_buffer_drains() -> None:
    """The fix's decoder setting: many more requests than the buffer has pages all complete,
    and the occupancy returns to zero."""

    async def body(pair: Pair) -> None:
        for i in range(1, 21):  # 60 chunks through a buffer of 6
            assert await pair.prefill(i)
            assert await pair.notified() == {i}
            out = await pair.decode(i)
            assert out["usage"]["prompt_tokens"] == PROMPT_TOKENS
            assert await pair.gauge(pair.d, "buffer_used_chunks") == 0
        m = await metrics(pair.s, pair.d)
        assert m["pdsim:lmcache_hit_requests_total"] == 20
        assert m["pdsim:lmcache_loaded_tokens_total"] == 20 * (PROMPT_TOKENS - 1)
        assert m["pdsim:lmcache_retrieved_chunks_total"] == 20 * 3
        assert await pair.gauge(pair.p, "staging_used_chunks") == 0
        async with pair.s.get(pair.d.url + "/_sim/lmcache/buffers") as resp:
            state = {"total": PAGES, "used": 0, "reserved": 0, "waiting": 0, "timeouts": 0}
            assert await resp.json() == {"receive": [state]}

    run_pair(0, body)


def test_with_skip_0_a_full_buffer_holds_pushes_back_until_a_decode_frees_it() -> None:
    """Back-pressure, not a leak: a push that finds the buffer full waits, and goes through
    (and notifies) once a decode retrieves its chunks."""

    async def body(pair: Pair) -> None:
        for i in (1, 2, 3):
            assert await pair.prefill(i)  # staged; two pushes fit, the third waits for pages
        first = await pair.notified()
        assert len(first) == 2 and first < {1, 2, 3}
        (waiting,) = {1, 2, 3} - first
        assert await pair.gauge(pair.d, "buffer_used_chunks") == PAGES
        assert await pair.gauge(pair.d, "buffer_waiting") == 1
        served = sorted(first)
        await pair.decode(served[0])
        assert await pair.notified() == {waiting}
        for i in (served[1], waiting):
            await pair.decode(i)
        assert await pair.gauge(pair.d, "buffer_used_chunks") == 0
        assert await pair.gauge(pair.d, "buffer_waiting") == 0

    run_pair(0, body)


def test_page_buffer_waits_for_pages_and_times_out() -> None:
    async def main() -> None:
        buf = PageBuffer(2, timeout=0.2)
        assert await buf.take_all(2) and buf.free == 0
        waiter = asyncio.create_task(buf.take())
        await asyncio.sleep(0.05)
        assert buf.waiting == 1 and not waiter.done()
        buf.give(1)
        assert await waiter and buf.used == 2
        assert not await buf.take_all(1)  # times out; nothing kept
        assert buf.used == 2 and buf.timeouts == 1
        buf.give(2)
        assert await buf.reserve(2) and not await buf.reserve(1)
        buf.unreserve(2)
        assert buf.state() == {"total": 2, "used": 0, "reserved": 0, "waiting": 0, "timeouts": 2}

    asyncio.run(main())


def test_a_push_that_times_out_fails_and_gives_its_pages_back() -> None:

    async def body(pair: Pair) -> None:
        for i in (1, 2, 3):
            assert await pair.prefill(i)  # two pushes take the 6 pages, one waits 0.2 s
        notified = await pair.notified(timeout=0.6)
        assert len(notified) == 2 and notified < {1, 2, 3}
        for _ in range(100):  # the third push gives up 0.2 s after it started waiting
            if (await metrics(pair.s, pair.p))["pdsim:lmcache_push_failures_total"] == 1:
                break
            await asyncio.sleep(0.02)
        assert await pair.notified(timeout=0.1) == set()
        d = await metrics(pair.s, pair.d)
        assert d['pdsim:lmcache_buffer_allocation_timeouts_total{rank="0"}'] == 1
        assert d['pdsim:lmcache_buffer_used_chunks{rank="0"}'] == PAGES
        p = await metrics(pair.s, pair.p)
        assert p["pdsim:lmcache_push_failures_total"] == 1
        assert p['pdsim:lmcache_staging_used_chunks{rank="0"}'] == 0

    run_pair(1, body, allocation_timeout=0.2)


def test_buffer_options_and_the_launchers_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ports = ("--pd-peer-init-port", "7300", "--pd-peer-alloc-port", "7400")

    def parsed(*argv: str) -> LMCacheSimConfig:
        cfg = config_from_args(parser.parse_args(list(argv)))
        assert cfg is not None
        return cfg

    receiver = parsed("--lmcache-role", "receiver", *ports)
    assert receiver.chunk_bytes == 32 * 2**20 and receiver.buffer_chunks == 64  # 2 GiB
    assert receiver.skip_last_n_tokens == 1
    assert parsed("--lmcache-role", "sender").buffer_chunks == 32  # 1 GiB of staging
    assert parsed("--lmcache-role", "receiver", "--lmcache-buffer-size", "8G").buffer_chunks == 256
    small = parsed("--lmcache-role", "receiver", "--lmcache-buffer-chunks", "5")
    assert small.buffer_chunks == 5 and small.buffer_bytes == 5 * 32 * 2**20
    tp2 = parsed(
        *("--lmcache-role", "receiver", "--tp", "2", "--lmcache-buffer-size", "2147483648"),
        *("--pd-peer-init-port", "1,2", "--pd-peer-alloc-port", "3,4"),
    )
    assert tp2.buffer_chunks == 128  # each rank holds half of a chunk's heads
    tuned = parsed(
        *("--lmcache-role", "receiver", "--lmcache-skip-last-n-tokens", "0"),
        *("--lmcache-allocation-timeout", "30"),
    )
    assert (tuned.skip_last_n_tokens, tuned.allocation_timeout) == (0, 30.0)
    for bad in (("--lmcache-buffer-size", "2X"), ("--lmcache-buffer-size", "0")):
        with pytest.raises(SystemExit):
            parser.parse_args(list(bad))
    with pytest.raises(SystemExit):
        parser.parse_args(["--lmcache-buffer-size", "1G", "--lmcache-buffer-chunks", "2"])
    with pytest.raises(ValueError, match="holds no chunk"):
        parsed("--lmcache-role", "receiver", "--lmcache-buffer-size", "1M")
