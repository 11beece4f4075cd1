"""The simulator's LMCache PD mode: push, ProxyNotif over ZMQ, serving from pushed KV."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from sim_helpers import config, metrics, notification_socket, post, run_with

from pdsim import SimServer
from pdsim.lmcache.chunks import chunk_keys
from pdsim.lmcache.cli import add_arguments, config_from_args
from pdsim.lmcache.config import LMCacheSimConfig
from tests.conftest import free_port

PROMPT = "push the cache from the prefiller into the decoder chunk by chunk " * 3


class PDMsgBase(msgspec.Struct, tag=True):  # as LMCache's pd_backend.py declares it
    pass


class ProxyNotif(PDMsgBase):
    req_id: str


LMCACHE_DECODER = msgspec.msgpack.Decoder(ProxyNotif)


async def counters(s: aiohttp.ClientSession, server: SimServer) -> dict[str, float]:
    """The sim's metrics, label sets dropped where there are none (`name{}` -> `name`)."""
    return {k.removesuffix("{}"): v for k, v in (await metrics(s, server)).items()}


def test_chunk_keys_chain_and_skip_short_prompts() -> None:
    assert [n for _, n in chunk_keys([1, 2, 3], 4)] == [3]  # PD saves the partial chunk
    assert chunk_keys([1, 2, 3], 4, save_unfull=False) == []  # 0.3.12-0.4.1: nothing (#2510)
    assert [n for _, n in chunk_keys(list(range(10)), 4, save_unfull=False)] == [4, 4]
    keys = chunk_keys(list(range(10)), 4)
    assert [n for _, n in keys] == [4, 4, 2]  # the partial last chunk is saved too
    other = chunk_keys([*range(8), 99, 9], 4)
    assert other[:2] == keys[:2] and other[2] != keys[2]
    assert chunk_keys([0, *range(1, 10)], 4)[0] == keys[0]


def test_cli_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])) is None
    cfg = config_from_args(
        parser.parse_args(
            [
                *("--lmcache-role", "receiver", "--tp", "2"),
                *("--pd-peer-init-port", "7300,7301", "--pd-peer-alloc-port", "7400,7401"),
            ]
        )
    )
    assert cfg is not None and cfg.init_ports == (7300, 7301) and cfg.alloc_ports == (7400, 7401)
    with pytest.raises(ValueError, match="needs 2 init"):
        config_from_args(parser.parse_args(["--lmcache-role", "receiver", "--tp", "2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--pd-peer-init-port", "x"])


def pair(tp: int = 1, chunk: int = 4, save_unfull: bool = True) -> tuple[list[Any], int]:
    notify = free_port()
    init = tuple(free_port() for _ in range(tp))
    alloc = tuple(free_port() for _ in range(tp))
    sender = LMCacheSimConfig(
        "sender", tp=tp, chunk_size=chunk, proxy_port=notify, save_unfull_chunk=save_unfull
    )
    receiver = LMCacheSimConfig(
        "receiver", tp=tp, chunk_size=chunk, init_ports=init, alloc_ports=alloc
    )
    return [config(lmcache=sender), config(lmcache=receiver)], notify


def spec(req_id: str, d: SimServer) -> dict[str, Any]:
    assert d.config.lmcache is not None
    return {
        "ret_first_tok": True,
        "disagg_spec": {
            "req_id": req_id,
            "receiver_host": "127.0.0.1",
            "receiver_init_port": list(d.config.lmcache.init_ports),
            "receiver_alloc_port": list(d.config.lmcache.alloc_ports),
        },
    }


async def notifications(sock: zmq.asyncio.Socket, n: int, timeout: float = 3.0) -> list[str]:
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(n):
            out.append(LMCACHE_DECODER.decode(await sock.recv()).req_id)
    return out


def run_pair(tp: int, chunk: int, body: Any, save_unfull: bool = True) -> None:
    configs, notify = pair(tp, chunk, save_unfull)

    async def with_pull(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        async with notification_socket(notify) as sock:
            await body(servers, s, sock)

    run_with(configs, with_pull)


@pytest.mark.parametrize("tp", [1, 2])
def test_push_notifies_once_per_rank_and_decoder_serves_from_pushed_kv(tp: int) -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession, sock: Any) -> None:
        p, d = servers
        leg = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": spec("lmc-1", d)}
        st, r = await post(s, p.url + "/v1/completions", leg)
        assert st == 200 and set(r["kv_transfer_params"]) == {"first_tok"}
        assert await notifications(sock, tp) == ["lmc-1"] * tp
        st, direct = await post(s, p.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        assert r["choices"][0]["text"] == direct["choices"][0]["text"]
        st, out = await post(s, d.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 6})
        assert st == 200 and out["usage"]["completion_tokens"] == 6
        m = await counters(s, d)
        assert m["pdsim:lmcache_hit_requests_total"] == 1
        assert m["pdsim:recomputed_requests_total"] == 0
        # the decoder looks up all but the last token (skip_last_n_tokens 1): whole chunks
        assert (
            m["pdsim:lmcache_loaded_tokens_total"] == (out["usage"]["prompt_tokens"] - 1) // 4 * 4
        )
        assert (await counters(s, p))["pdsim:lmcache_notifications_sent_total"] == tp
        st, _ = await post(s, d.url + "/v1/completions", {"prompt": "other words", "max_tokens": 2})
        m = await counters(s, d)
        assert m["pdsim:lmcache_missed_requests_total"] == 1
        assert m["pdsim:recomputed_requests_total"] == 1

    run_pair(tp, 4, body)


def test_short_prompt_notifies_since_pd_saves_the_partial_chunk() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession, sock: Any) -> None:
        p, d = servers
        leg = {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": spec("lmc-short", d)}
        st, r = await post(s, p.url + "/v1/completions", leg)
        assert st == 200 and "first_tok" in r["kv_transfer_params"]
        assert await notifications(sock, 1) == ["lmc-short"]
        assert (await counters(s, p))["pdsim:lmcache_unsaved_requests_total"] == 0

    run_pair(1, 64, body)


def test_short_prompt_never_notifies_without_partial_chunks() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession, sock: Any) -> None:
        p, d = servers
        leg = {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": spec("lmc-short", d)}
        st, r = await post(s, p.url + "/v1/completions", leg)
        assert st == 200 and "first_tok" in r["kv_transfer_params"]
        with pytest.raises(TimeoutError):
            await notifications(sock, 1, timeout=0.5)
        assert (await counters(s, p))["pdsim:lmcache_unsaved_requests_total"] == 1

    run_pair(1, 64, body, save_unfull=False)


def test_switches_drop_and_delay_notifications() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession, sock: Any) -> None:
        p, d = servers
        leg = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": spec("lmc-a", d)}
        st, _ = await post(s, p.url + "/_sim/lmcache", {"drop_next": 1})
        assert st == 200
        await post(s, p.url + "/v1/completions", leg)
        with pytest.raises(TimeoutError):
            await notifications(sock, 1, timeout=0.3)
        leg["kv_transfer_params"] = spec("lmc-b", d)
        await post(s, p.url + "/_sim/lmcache", {"delay_notifications": 0.4})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await post(s, p.url + "/v1/completions", leg)
        assert await notifications(sock, 1) == ["lmc-b"] and loop.time() - t0 >= 0.4
        st, _ = await post(s, p.url + "/_sim/lmcache", {"nope": 1})
        assert st == 400
        assert (await counters(s, p))["pdsim:lmcache_notifications_dropped_total"] == 1

    run_pair(1, 4, body)


def test_unreachable_receiver_means_no_notification() -> None:
    configs, _ = pair()
    dead = replace(configs[1].lmcache, init_ports=(free_port(),), alloc_ports=(free_port(),))

    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        d.config.lmcache = dead
        leg = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": spec("lmc-x", d)}
        st, _ = await post(s, p.url + "/v1/completions", leg)
        assert st == 200
        for _ in range(50):
            if (await counters(s, p))["pdsim:lmcache_push_failures_total"] == 1:
                break
            await asyncio.sleep(0.02)
        assert (await counters(s, p))["pdsim:lmcache_notifications_sent_total"] == 0

    run_with(configs, body)
