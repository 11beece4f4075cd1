"""Several choices in one request (prompt lists, n, seeds), echo, logprobs and priority, as the
simulator serves them like vLLM 0.32."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from sim_helpers import config, metrics, post, run_with, stream_events

from pdsim import SimServer, Timing

PROMPTS = ["the river turned toward the sea", "a cache of blocks", "decode one token"]
KV0 = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
       "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


def texts(r: Any) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in r["choices"]]


def test_prompt_lists_and_samples() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        _, batch = await post(s, url, {"prompt": PROMPTS, "max_tokens": 5, "n": 2, "seed": 4})
        singles = [
            (await post(s, url, {"prompt": p, "max_tokens": 5, "seed": 4 + j}))[1]
            for p in PROMPTS
            for j in range(2)
        ]
        assert [c["index"] for c in batch["choices"]] == list(range(6))
        assert texts(batch) == [texts(r)[0] for r in singles]
        assert texts(batch)[0] != texts(batch)[1]  # two samples of one prompt differ
        prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in singles[::2])
        assert batch["usage"]["prompt_tokens"] == prompt_tokens
        assert batch["usage"]["completion_tokens"] == 30
        _, greedy = await post(s, url, {"prompt": PROMPTS[0], "max_tokens": 5, "n": 2})
        assert texts(greedy)[0] == texts(greedy)[1]  # no seed: the greedy sample twice
        st, err = await post(s, url, {"prompt": PROMPTS[0], "n": 2, "temperature": 0})
        assert st == 400 and err["error"]["message"].startswith("n must be 1")

    run_with([config()], body)


def test_echo_and_logprobs() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        req = {"prompt": PROMPTS[0], "max_tokens": 4}
        _, plain = await post(s, url, req)
        _, echo = await post(s, url, {**req, "echo": True})
        assert texts(echo)[0] == PROMPTS[0] + texts(plain)[0]
        _, only = await post(s, url, {**req, "echo": True, "max_tokens": 0})
        assert texts(only)[0] == PROMPTS[0] and only["usage"]["completion_tokens"] == 1
        _, lp = await post(s, url, {**req, "logprobs": 3})
        _, again = await post(s, url, {**req, "logprobs": 3})
        logprobs = lp["choices"][0]["logprobs"]
        assert logprobs == again["choices"][0]["logprobs"]  # deterministic
        assert "".join(logprobs["tokens"]) == texts(plain)[0]
        assert all(len(top) <= 4 for top in logprobs["top_logprobs"])
        chat = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 3}
        _, c = await post(s, servers[0].url + "/v1/chat/completions",
                          {**chat, "logprobs": True, "top_logprobs": 2})  # fmt: skip
        content = c["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in content] and all(len(e["top_logprobs"]) == 2 for e in content)

    run_with([config()], body)


def test_logprobs_after_a_pull_equal_direct_and_prompt_logprobs_load_nothing() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        p, d = servers
        req = {"prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 2}
        leg = {"prompt": PROMPTS[0], "max_tokens": 1, "ignore_eos": True, "kv_transfer_params": KV0}
        _, direct = await post(s, d.url + "/v1/completions", req)
        kv = (await post(s, p.url + "/v1/completions", leg))[1]["kv_transfer_params"]
        _, pulled = await post(s, d.url + "/v1/completions", {**req, "kv_transfer_params": kv})
        assert pulled["choices"] == direct["choices"]  # output logprobs need no prompt logits
        assert (await metrics(s, d))["vllm:nixl_xfer_time_seconds_count"] == 1
        plp = {**req, "prompt_logprobs": 1}
        _, direct = await post(s, d.url + "/v1/completions", plp)
        kv = (await post(s, p.url + "/v1/completions", leg))[1]["kv_transfer_params"]
        assert (await metrics(s, p))["pdsim:held_kv_blocks"] > 0
        _, got = await post(s, d.url + "/v1/completions", {**plp, "kv_transfer_params": kv})
        assert got["choices"] == direct["choices"]
        assert (await metrics(s, d))["vllm:nixl_xfer_time_seconds_count"] == 1  # no pull
        for _ in range(100):  # the decoder told the producer to free the blocks
            if (await metrics(s, p))["pdsim:held_kv_blocks"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await metrics(s, p))["pdsim:held_kv_blocks"] == 0
        async with s.get(d.url + "/_sim/requests") as resp:
            assert (await resp.json())["requests"][-1]["kv"] == "skipped"

    run_with([config(role="prefill"), config(role="decode")], body)


def test_streamed_choices_and_continuous_usage() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        req = {"prompt": PROMPTS[:2], "max_tokens": 4, "n": 2, "seed": 9}
        _, whole = await post(s, url, req)
        events = await stream_events(s, url, {**req, "stream": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}})  # fmt: skip
        assert events[-1] == "[DONE]" and events[-2]["choices"] == []
        got: dict[int, str] = {}
        for e in events[:-2]:
            choice = e["choices"][0]
            got[choice["index"]] = got.get(choice["index"], "") + choice["text"]
            assert e["usage"]["completion_tokens"] >= 1
        assert got == dict(enumerate(texts(whole)))
        assert events[-2]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]

    run_with([config(timing=Timing(speed_factor=0.01))], body)


def test_priority_policy_orders_the_waiting_queue() -> None:
    """With one running sequence at a time, a later request of a better priority runs first."""

    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        done: list[str] = []

        async def call(name: str, priority: int, tokens: int) -> None:
            req = {"prompt": name, "max_tokens": tokens, "ignore_eos": True, "priority": priority}
            assert (await post(s, url, req))[0] == 200
            done.append(name)

        first = asyncio.create_task(call("first", 0, 30))
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(call("batch", 10, 2))]
        await asyncio.sleep(0.01)
        later.append(asyncio.create_task(call("urgent", 0, 2)))
        await asyncio.gather(first, *later)
        assert done == ["first", "urgent", "batch"]

    run_with([config(scheduling_policy="priority", max_num_seqs=1,
                     timing=Timing(speed_factor=0.5))], body)  # fmt: skip
