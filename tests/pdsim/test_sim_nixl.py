"""The NIXL flow: prefill -> kv_transfer_params -> decode pulls, and every way it can fail."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from sim_helpers import config, metrics, post, run_with

from pdsim import SimServer

PROMPT = "prefill the cache then decode the token block by block " * 4
PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


async def prefill(s: aiohttp.ClientSession, p: SimServer, prompt: str = PROMPT) -> Any:
    body = {"prompt": prompt, "max_tokens": 1, "ignore_eos": True, "kv_transfer_params": PREFILL_KV}
    st, r = await post(s, p.url + "/v1/completions", body)
    assert st == 200
    return r["kv_transfer_params"]


def test_full_flow_pulls_and_matches_direct_run() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        kv = await prefill(s, p)
        assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
        assert kv["remote_engine_id"] == p.engine_id
        assert kv["remote_port"] == p.side_channel_port and kv["tp_size"] == 1
        assert len(kv["remote_block_ids"][0]) == -(-kv["remote_num_tokens"] // 16)
        assert (await metrics(s, p))["pdsim:held_kv_blocks"] == len(kv["remote_block_ids"][0])
        req = {"prompt": PROMPT, "max_tokens": 12}
        _, direct = await post(s, p.url + "/v1/completions", req)
        _, dis = await post(s, d.url + "/v1/completions", {**req, "kv_transfer_params": kv})
        assert dis["choices"][0]["text"] == direct["choices"][0]["text"]
        assert dis["kv_transfer_params"] is None
        md, mp = await metrics(s, d), await metrics(s, p)
        assert md["vllm:nixl_xfer_time_seconds_count"] == 1
        assert md["pdsim:kv_pulled_requests_total"] == 1
        assert md['vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}'] > 0
        assert mp["pdsim:held_kv_blocks"] == 0  # freed after the read
        async with s.get(d.url + "/_sim/requests") as resp:
            rec = (await resp.json())["requests"][-1]
        assert rec["kv"] == "pulled" and rec["outcome"] == "completed"

    run_with([config(role="prefill"), config(role="decode")], body)


def test_params_only_when_finished_by_length() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p = servers[0]
        _, r = await post(s, p.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
        stop = r["choices"][0]["text"].split()[0]
        body = {"prompt": PROMPT, "max_tokens": 8, "stop": [stop], "kv_transfer_params": PREFILL_KV}
        _, r = await post(s, p.url + "/v1/completions", body)
        assert r["choices"][0]["finish_reason"] == "stop" and r["kv_transfer_params"] is None
        assert (await metrics(s, p))["pdsim:held_kv_blocks"] == 0
        assert p.engine.pool.used_blocks == 0

    run_with([config()], body)


def test_failures_recompute_and_are_counted() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        url = d.url + "/v1/completions"
        req = {"prompt": PROMPT, "max_tokens": 4}
        _, direct = await post(s, url, req)
        cases: list[tuple[dict[str, Any], str]] = []
        kv = await prefill(s, p, "a different prompt entirely about the sea " * 3)
        cases.append((kv, "content_mismatch"))
        kv = await prefill(s, p)
        cases.append(({**kv, "remote_host": None}, "invalid_params"))
        cases.append(({**kv, "remote_request_id": "nope"}, "unknown_request"))
        cases.append(({**kv, "remote_port": 1}, "unreachable"))
        for params, failure in cases:
            st, r = await post(s, url, {**req, "kv_transfer_params": params})
            assert st == 200 and r["choices"][0]["text"] == direct["choices"][0]["text"]
            async with s.get(d.url + "/_sim/requests") as resp:
                rec = (await resp.json())["requests"][-1]
            assert (rec["kv"], rec["kv_failure"]) == ("recomputed", failure)
        m = await metrics(s, d)
        assert m["pdsim:recomputed_requests_total"] == 4
        assert m["vllm:nixl_num_failed_transfers_total"] == 4
        assert m["vllm:nixl_xfer_time_seconds_count"] == 0

    run_with([config(), config(kv_load_failure_policy="recompute")], body)


def test_incomplete_params_answer_the_crash_500_and_the_sim_stays_up() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        d = servers[0]
        url = d.url + "/v1/completions"
        for kv in (
            {"do_remote_prefill": True},
            {"do_remote_prefill": True, "remote_block_ids": [[1]]},
        ):
            st, r = await post(
                s, url, {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": kv}
            )
            assert st == 500 and r["error"]["type"] == "InternalServerError"
        assert (await post(s, url, {"prompt": PROMPT, "max_tokens": 2}))[0] == 200

    run_with([config()], body)


def test_lease_expiry_frees_blocks_and_counts() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        kv = await prefill(s, p)
        assert (await metrics(s, p))["pdsim:held_kv_blocks"] > 0
        await asyncio.sleep(0.4)
        mp = await metrics(s, p)
        assert mp["pdsim:held_kv_blocks"] == 0
        assert mp["vllm:nixl_num_kv_expired_reqs_total"] == 1
        assert p.engine.pool.used_blocks == 0
        # like vLLM 0.32: the decoder reads the freed blocks; nothing notices
        req = {"prompt": PROMPT, "kv_transfer_params": kv}
        assert (await post(s, d.url + "/v1/completions", req))[0] == 200
        async with s.get(d.url + "/_sim/requests") as resp:
            rec = (await resp.json())["requests"][-1]
        assert rec["kv"] == "pulled"
        await post(s, p.url + "/v1/completions", {"prompt": "fresh words " * 60})  # reuses them
        st, _ = await post(s, d.url + "/v1/completions", req)
        assert st == 500  # overwritten: where real NIXL would silently use another's KV

    run_with([config(kv_lease_seconds=0.2, num_gpu_blocks=8), config()], body)


def test_fail_policy_and_side_channel_fault() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        kv = await prefill(s, p)
        await post(s, p.url + "/_sim/faults", {"side_channel_error": True})
        st, r = await post(
            s, d.url + "/v1/completions", {"prompt": PROMPT, "kv_transfer_params": kv}
        )
        assert st == 500 and r["error"]["code"] == 500
        assert (await metrics(s, d))["vllm:nixl_num_failed_transfers_total"] == 1

    run_with([config(), config(kv_load_failure_policy="fail")], body)


def test_timed_engine_pull_and_batching() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        kv = await prefill(s, p)
        req = {"prompt": PROMPT, "max_tokens": 5}
        outs = await asyncio.gather(
            post(s, d.url + "/v1/completions", {**req, "kv_transfer_params": kv}),
            *[post(s, d.url + "/v1/completions", req) for _ in range(4)],
        )
        texts = {o[1]["choices"][0]["text"] for o in outs}
        assert len(texts) == 1
        assert (await metrics(s, d))["pdsim:kv_pulled_requests_total"] == 1

    from pdsim import Timing

    fast = Timing(speed_factor=0.1)
    run_with([config(timing=fast), config(timing=fast, max_num_seqs=2)], body)
