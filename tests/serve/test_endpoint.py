"""The request path end to end: OpenAI SDK -> proxy -> simulated prefiller and decoder."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    MODEL,
    Proxy,
    Sim,
    free_port,
    running,
    sse_events,
    start_proxy,
    wait_for,
)

CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about KV caches."}]}
PULLS = "vllm:nixl_xfer_time_seconds_count"
RECOMPUTED = "pdsim:recomputed_requests_total"


def client(proxy: Proxy, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0, **kw)


def sdk_completion_text(proxy: Proxy, body: dict[str, Any], stream: bool) -> str:
    """A completion's text through the proxy with the OpenAI SDK, streamed or whole."""
    sdk = client(proxy)
    if stream:
        return "".join(
            c.choices[0].text
            for c in sdk.completions.create(stream=True, **body)  # type: ignore[call-overload]
            if c.choices
        )
    text: str = sdk.completions.create(**body).choices[0].text  # type: ignore[call-overload]
    return text


def direct(sim: Sim, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request served by one engine alone, no disaggregation."""
    data: dict[str, Any] = httpx.post(sim.url + path, json=body, timeout=10).json()
    return data


def test_sdk_chat_non_stream_equals_direct_and_kv_was_pulled(proxy: Proxy) -> None:
    decoder = proxy.decode[0]
    answer = client(proxy).chat.completions.create(max_tokens=20, **CHAT_BODY)  # type: ignore[call-overload]
    reference = direct(decoder, "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 20})
    assert answer.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert answer.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert answer.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert decoder.metric(PULLS) == 1
    assert decoder.metric(RECOMPUTED) == 0


def check_sdk_chat_stream_with_usage(proxy: Proxy, kv_handed_over: Callable[[], bool]) -> None:
    """A streamed chat with `max_completion_tokens` and usage, through the SDK: the KV was handed
    over (checked before the reference request, which may touch the decoder's cache), the text
    equals the decoder's own answer, and the usage chunk comes last with the right count."""
    stream = client(proxy).chat.completions.create(  # type: ignore[call-overload]
        max_completion_tokens=24, stream=True, stream_options={"include_usage": True}, **CHAT_BODY
    )
    chunks = list(stream)
    assert kv_handed_over()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reference = direct(
        proxy.decode[0], "/v1/chat/completions", {**CHAT_BODY, "max_completion_tokens": 24}
    )
    assert text == reference["choices"][0]["message"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reference["usage"]["completion_tokens"]


def test_sdk_chat_stream_with_usage(proxy: Proxy) -> None:
    check_sdk_chat_stream_with_usage(proxy, lambda: proxy.decode[0].metric(PULLS) == 1)


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_completions(proxy: Proxy, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16}
    reference = direct(proxy.decode[0], "/v1/completions", body)
    assert sdk_completion_text(proxy, body, stream) == reference["choices"][0]["text"]
    assert proxy.decode[0].metric(PULLS) == 1


def test_bodies_each_leg_received(proxy: Proxy) -> None:
    body = {
        **CHAT_BODY,
        "max_completion_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["zzz"],
        "stop_token_ids": [3],
        "min_tokens": 2,
        "temperature": 0,
    }
    resp = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 200
    [prefill] = proxy.prefill[0].generation_records()
    [decode] = proxy.decode[0].generation_records()
    assert prefill["body"] == {
        "model": MODEL,
        "messages": CHAT_BODY["messages"],
        "max_completion_tokens": 1,
        "max_tokens": 1,
        "stream": False,
        "temperature": 0,
        "ignore_eos": True,
        "n": 1,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    params = decode["body"].pop("kv_transfer_params")
    assert decode["body"] == body
    assert params["do_remote_prefill"] is True and params["remote_block_ids"]
    assert params["remote_port"] == proxy.prefill[0].side_channel_port


def test_request_id_on_both_legs_and_echoed(proxy: Proxy) -> None:
    resp = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
        headers={"X-Request-Id": "client-id-42"},
    )
    assert resp.headers["x-request-id"] == "client-id-42"
    resp = httpx.post(
        proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
    )
    generated = resp.headers["x-request-id"]
    assert generated.startswith("pdp-")
    for sim in (proxy.prefill[0], proxy.decode[0]):
        assert [r["x_request_id"] for r in sim.generation_records()] == ["client-id-42", generated]


def test_upstream_4xx_passes_through(proxy: Proxy) -> None:
    resp = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": "no-such-model", "prompt": "x", "max_tokens": 2},
    )
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert "no-such-model" in error["message"]
    proxy.decode[0].faults(error_status=422, error_message="bad sampling", count=1)
    resp = httpx.post(
        proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
    )
    assert resp.status_code == 422 and resp.json()["error"]["message"] == "bad sampling"


@pytest.fixture(scope="module")
def strict_proxy(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    """1p1d with failover off: every engine failure reaches the client as an error."""
    config = logs / "strict.yaml"
    config.write_text(
        "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false}\n"
        "timeouts: {prefill: 0.5, decode_first_byte: 0.5, decode_idle: 0.5}\n"
        "health: {interval: 0}\n"
    )
    with running(
        start_proxy(logs, [sims["p0"]], [sims["d0"]], "--config", str(config), name="strict")
    ) as proxy:
        yield proxy  # type: ignore[misc]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_upstream_5xx_is_502(strict_proxy: Proxy, clean_sims: dict[str, Sim], role: str) -> None:
    sim = clean_sims["p0"] if role == "prefill" else clean_sims["d0"]
    sim.faults(error_status=500, error_message="engine exploded", count=1)
    resp = httpx.post(
        strict_proxy.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True},
    )
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/json"
    message = resp.json()["error"]["message"]
    assert "engine exploded" in message and role in message and sim.url in message


def test_garbage_prefill_body_is_502(strict_proxy: Proxy, clean_sims: dict[str, Sim]) -> None:
    clean_sims["p0"].faults(garbage_body=True, count=1)
    resp = httpx.post(
        strict_proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
    )
    assert resp.status_code == 502 and "not JSON" in resp.json()["error"]["message"]


def test_dead_worker_is_502_naming_it_and_health_says_503(logs: Path, sims: dict[str, Sim]) -> None:
    dead = Sim(f"http://127.0.0.1:{free_port()}", [], None, sims["d0"].proc)
    config = logs / "no-active-checks.yaml"
    config.write_text("health: {interval: 0}\n")
    proxy = start_proxy(logs, [sims["p0"]], [dead], "--config", str(config), name="dead")
    with running(proxy):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        resp = httpx.post(proxy.url + "/v1/completions", json=body)
        assert resp.status_code == 502
        assert "cannot connect to decode worker" in resp.json()["error"]["message"]
        health = httpx.get(proxy.url + "/health")
        assert health.status_code == 503 and health.json()["decode"][0]["health"] == "unhealthy"
        # the only decoder fails its check: the proxy still tries it (panic routing), and says so
        resp = httpx.post(proxy.url + "/v1/completions", json=body)
        assert resp.status_code == 502 and dead.url in resp.json()["error"]["message"]
        assert "routing to them anyway" in proxy.log_text()


def test_timeouts_are_504(strict_proxy: Proxy, clean_sims: dict[str, Sim]) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    p0.faults(stall_seconds=3, count=1)
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    resp = httpx.post(strict_proxy.url + "/v1/completions", json=body)
    assert resp.status_code == 504 and time.monotonic() - t0 < 2.5
    assert "prefill" in resp.json()["error"]["message"]
    d0.faults(stall_seconds=3, count=1)
    resp = httpx.post(strict_proxy.url + "/v1/completions", json={**body, "stream": True})
    assert resp.status_code == 504 and "decode" in resp.json()["error"]["message"]


def test_failure_mid_stream_ends_with_error_event(proxy: Proxy) -> None:
    proxy.decode[0].faults(drop_after_chunks=3, count=1)
    resp = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True},
    )
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and "decode" in events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])
    assert resp.content.count(b"\n\n") == len(events)  # no half event glued to the error


def test_upstream_error_event_is_relayed(proxy: Proxy) -> None:
    proxy.decode[0].faults(error_event_after_chunks=2, count=1)
    resp = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True},
    )
    events = sse_events(resp.content)
    assert any(isinstance(e, dict) and "error" in e for e in events)
    assert events[-1] == "[DONE]"


def _disconnect_after(proxy: Proxy, body: dict[str, Any], seconds: float, chunks: int = 0) -> None:
    """Send `body`, then leave after `seconds`, or after reading `chunks` chunks if given."""

    def go() -> None:
        try:
            with httpx.stream(
                "POST", proxy.url + "/v1/completions", json=body, timeout=seconds
            ) as r:
                for i, _ in enumerate(r.iter_bytes(), 1):
                    if i == chunks:
                        return  # closing the stream closes the connection
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    thread = threading.Thread(target=go)
    thread.start()
    thread.join()


def test_disconnect_during_prefill_cancels_prefill(proxy: Proxy) -> None:
    prefiller, decoder = proxy.prefill[0], proxy.decode[0]
    prefiller.faults(stall_seconds=5, count=1)
    _disconnect_after(proxy, {"model": MODEL, "prompt": "x", "max_tokens": 5}, 0.5)
    wait_for(lambda: prefiller.metric("pdsim:aborted_requests_total", phase="prefill") == 1)
    assert decoder.generation_records() == []
    wait_for(
        lambda: proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill") >= 1
    )
    wait_for(lambda: proxy.stats()["workers"]["prefill"][0]["inflight"] == 0)


def test_disconnect_during_decode_closes_decode_stream(proxy: Proxy) -> None:
    decoder = proxy.decode[0]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 16000, "stream": True, "ignore_eos": True}
    _disconnect_after(proxy, body, 5, chunks=2)
    wait_for(lambda: decoder.metric("pdsim:aborted_requests_total", phase="decode") == 1)
    wait_for(lambda: proxy.stats()["workers"]["decode"][0]["inflight"] == 0)


def test_prefill_without_params_is_counted_as_recompute(
    logs: Path, clean_sims: dict[str, Sim]
) -> None:
    from tests.conftest import start_sim

    plain = start_sim(logs, "no-connector", "--no-kv-transfer")
    with (
        running(plain),
        running(start_proxy(logs, [plain], [clean_sims["d0"]], name="recompute")) as proxy,
    ):
        resp = httpx.post(
            proxy.url + "/v1/completions",
            json={"model": MODEL, "prompt": "hello there", "max_tokens": 4},
        )  # type: ignore[attr-defined]
        assert resp.status_code == 200
        assert proxy.metrics().total("pdproxy_kv_recompute_total", reason="null_params") == 1  # type: ignore[attr-defined]
        assert (
            "will recompute the prompt" in proxy.log_text()
            and resp.headers["x-request-id"] in proxy.log_text()
        )
        assert "kv_transfer_params" not in clean_sims["d0"].generation_records()[0]["body"]


def test_xpyd_least_loaded_spreads(proxy_2p2d: Proxy) -> None:
    # Only the prefillers stall: a decoder is chosen on arrival and counts the request in flight
    # through its prefill, so both choices see every earlier request while all four are placed.
    for sim in proxy_2p2d.prefill:
        sim.faults(stall_seconds=5)
    body = {"model": MODEL, "prompt": "spread me", "max_tokens": 2}
    threads = [
        threading.Thread(
            target=httpx.post,
            args=(proxy_2p2d.url + "/v1/completions",),
            kwargs={"json": body, "timeout": 20},
        )
        for _ in range(4)
    ]

    def prefill_inflight() -> int:
        return sum(w["inflight"] for w in proxy_2p2d.stats()["workers"]["prefill"])

    for started, t in enumerate(threads, 1):
        t.start()
        # each request is placed before the next arrives, and none can finish meanwhile
        wait_for(lambda n=started: prefill_inflight() == n)  # type: ignore[misc]
    for t in threads:
        t.join()
    counts = [len(s.generation_records()) for s in proxy_2p2d.prefill + proxy_2p2d.decode]
    assert counts == [2, 2, 2, 2]
    workers = proxy_2p2d.stats()["workers"]
    assert all(w["inflight"] == 0 for role in ("prefill", "decode") for w in workers[role])


def test_bad_input_gets_4xx_and_proxy_keeps_serving(proxy: Proxy) -> None:
    cases = [
        ("/v1/chat/completions", b"{", 400, "not valid JSON"),
        ("/v1/chat/completions", b'{"model":"m","messages":[]}', 400, "messages"),
        ("/v1/completions", b'{"model":"m","prompt":["a",[1]]}', 400, "not mixed"),
        ("/v1/completions", b'{"model":"m","prompt":[]}', 400, "prompt"),
        ("/v1/completions", b'{"model":"m","prompt":"a","n":0}', 400, "'n'"),
        ("/v1/completions", b'{"model":"m","prompt":"a","n":2,"temperature":0}', 400, "greedy"),
        ("/v1/completions", b'{"model":"m","prompt":"a","priority":"hi"}', 400, "priority"),
        ("/v1/completions", b'{"model":"m","prompt":"a","max_tokens":-1}', 400, "max_tokens"),
        ("/v1/completions", b'{"model":"m","prompt":"a","max_tokens":"9"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model":"m","prompt":"a","max_tokens":1e12}', 400, "max_tokens"),
        ("/v1/completions", b'{"model":"m","prompt":1}', 400, "prompt"),
        ("/v1/chat/completions", b'{"model":"m"}', 400, "messages"),
        ("/v1/chat/completions", b'{"model":7,"messages":[{"role":"user"}]}', 400, "model"),
    ]
    for path, raw, status, words in cases:
        resp = httpx.post(proxy.url + path, content=raw)
        assert resp.status_code == status
        assert words in resp.json()["error"]["message"]
    assert httpx.get(proxy.url + "/v1/completions").status_code == 405
    assert httpx.get(proxy.url + "/nope").json()["error"]["type"] == "NotFoundError"
    assert proxy.prefill[0].generation_records() == []
    ok = httpx.post(
        proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}
    )
    assert ok.status_code == 200
