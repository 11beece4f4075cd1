"""HTTP surface: shapes of both endpoints, streaming, errors, tokenize, models, health."""

from __future__ import annotations

from typing import Any

import aiohttp
from sim_helpers import config, metrics, post, run_with, stream_events

from pdsim import SimServer

PROMPT = "the quick cache token flows to the decode side of the river " * 3
CHAT = [{"role": "user", "content": "tell me about the river"}]


def test_completion_shape_and_determinism() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        req = {"model": "pdsim/llama-8b", "prompt": PROMPT, "max_tokens": 7}
        st, r1 = await post(s, url, req, {"X-Request-Id": "abc"})
        assert st == 200
        assert r1["id"] == "cmpl-abc" and r1["object"] == "text_completion"
        choice = r1["choices"][0]
        assert choice["finish_reason"] == "length" and choice["text"]
        assert r1["usage"]["completion_tokens"] == 7
        assert r1["usage"]["total_tokens"] == r1["usage"]["prompt_tokens"] + 7
        assert "kv_transfer_params" in r1 and r1["kv_transfer_params"] is None
        _, r2 = await post(s, url, req)
        assert r2["choices"][0]["text"] == choice["text"]
        async with s.post(url, json=req, headers={"X-Request-Id": "xyz"}) as resp:
            assert "X-Request-Id" not in resp.headers  # like vLLM without the flag

    run_with([config()], body)


def test_request_id_headers_flag() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        req = {"prompt": PROMPT, "max_tokens": 2}
        async with s.post(url, json=req, headers={"X-Request-Id": "xyz"}) as resp:
            assert resp.headers["X-Request-Id"] == "xyz"
        async with s.post(url, json={**req, "model": "nope"}) as resp:
            assert resp.status == 404 and len(resp.headers["X-Request-Id"]) == 32

    run_with([config(request_id_headers=True)], body)


def test_streams_match_full_responses() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        base = servers[0].url
        req: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 6}
        _, full = await post(s, base + "/v1/completions", req)
        ev = await stream_events(
            s,
            base + "/v1/completions",
            {**req, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert ev[-1] == "[DONE]"
        assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 6
        text = "".join(e["choices"][0]["text"] for e in ev[:-2])
        assert text == full["choices"][0]["text"]
        assert ev[-3]["choices"][0]["finish_reason"] == "length"

        creq: dict[str, Any] = {"messages": CHAT, "max_completion_tokens": 5}
        _, cfull = await post(s, base + "/v1/chat/completions", creq)
        assert cfull["object"] == "chat.completion"
        assert cfull["choices"][0]["message"]["role"] == "assistant"
        ev = await stream_events(s, base + "/v1/chat/completions", {**creq, "stream": True})
        assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert ev[0]["object"] == "chat.completion.chunk"
        assert ev[-1] == "[DONE]" and all(e == "[DONE]" or e["choices"] for e in ev)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[1:-1])
        assert text == cfull["choices"][0]["message"]["content"]

    run_with([config()], body)


def test_stop_strings_tokens_eos_and_min_tokens() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        _, r = await post(s, url, {"prompt": PROMPT, "max_tokens": 20})
        words = r["choices"][0]["text"].split()
        stop = words[3]
        _, r2 = await post(s, url, {"prompt": PROMPT, "max_tokens": 20, "stop": [stop]})
        c = r2["choices"][0]
        assert c["finish_reason"] == "stop" and c["stop_reason"] == stop
        assert stop not in c["text"] and r["choices"][0]["text"].startswith(c["text"])
        tok = await post(s, servers[0].url + "/tokenize", {"prompt": stop})
        stop_id = tok[1]["tokens"][-1]
        _, r3 = await post(
            s, url, {"prompt": PROMPT, "max_tokens": 20, "stop_token_ids": [stop_id]}
        )
        assert r3["choices"][0]["stop_reason"] == stop_id
        _, r4 = await post(
            s, url, {"prompt": PROMPT, "max_tokens": 20, "stop": [stop], "min_tokens": 20}
        )
        assert r4["choices"][0]["finish_reason"] == "length"

    run_with([config()], body)

    async def eos(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        _, r = await post(s, url, {"prompt": PROMPT, "max_tokens": 50})
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["stop_reason"] is None
        _, r2 = await post(s, url, {"prompt": PROMPT, "max_tokens": 50, "ignore_eos": True})
        assert r2["choices"][0]["finish_reason"] == "length"
        assert r2["usage"]["completion_tokens"] == 50

    run_with([config(eos_probability=0.5)], eos)


def test_errors_are_openai_shaped() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        url = servers[0].url + "/v1/completions"
        async with s.post(url, data=b"{not json") as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
        st, r = await post(s, url, {"model": "nope", "prompt": "hi"})
        assert st == 404 and r["error"]["type"] == "NotFoundError"
        st, r = await post(s, url, {"prompt": "hi", "max_tokens": 0})
        assert st == 400 and r["error"]["param"] == "max_tokens"
        st, r = await post(s, url, {"prompt": "word " * 100})
        assert st == 400 and "maximum context length" in r["error"]["message"]
        st, r = await post(s, url, {"prompt": "hi", "n": 2, "temperature": 0})
        assert st == 400 and "greedy sampling" in r["error"]["message"]
        st, r = await post(s, url, {"prompt": "hi", "n": 0})
        assert st == 400 and r["error"]["message"] == "n must be at least 1, got 0."
        st, r = await post(s, servers[0].url + "/v1/chat/completions", {"max_tokens": 3})
        assert st == 400 and r["error"]["param"] == "body.messages"
        assert r["error"]["type"] == "Bad Request"

    run_with([config(max_model_len=64)], body)


def test_models_tokenize_health_version_metrics() -> None:
    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        base = servers[0].url
        async with s.get(base + "/v1/models") as resp:
            data = await resp.json()
            assert data["object"] == "list" and data["data"][0]["id"] == "pdsim/llama-8b"
        st, tok = await post(s, base + "/tokenize", {"prompt": "the river, again"})
        assert st == 200 and tok["count"] == len(tok["tokens"]) == 5
        assert tok["max_model_len"] == servers[0].config.max_model_len
        st, ctok = await post(s, base + "/tokenize", {"messages": CHAT})
        _, chat = await post(s, base + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert ctok["count"] == chat["usage"]["prompt_tokens"]
        _, detok = await post(s, base + "/detokenize", {"tokens": tok["tokens"]})
        assert detok["prompt"] == " the river, again"
        async with s.get(base + "/health") as resp:
            assert resp.status == 200 and await resp.read() == b""
        async with s.get(base + "/version") as resp:
            assert "version" in await resp.json()
        m = await metrics(s, servers[0])
        assert m["vllm:generation_tokens_total"] == 2
        assert m['vllm:request_success_total{finished_reason="length"}'] == 1
        assert m["vllm:num_requests_running"] == 0

    run_with([config()], body)


def test_prefix_cache_counters_as_vllm_names_them() -> None:
    shared = "a long system prompt that every request of this tenant starts with, " * 8

    async def body(servers: list[SimServer], s: aiohttp.ClientSession) -> None:
        cached, plain = servers
        for server in servers:
            for tail in ("first question", "second question"):
                st, _ = await post(
                    s, server.url + "/v1/completions", {"prompt": shared + tail, "max_tokens": 1}
                )
                assert st == 200
        m = await metrics(s, cached)
        assert m["vllm:prefix_cache_queries_total"] > 0
        assert 0 < m["vllm:prefix_cache_hits_total"] < m["vllm:prefix_cache_queries_total"]
        m = await metrics(s, plain)  # no prefix cache: nothing counted, as vLLM
        assert m["vllm:prefix_cache_queries_total"] == m["vllm:prefix_cache_hits_total"] == 0

    run_with([config(prefix_caching=True), config()], body)
