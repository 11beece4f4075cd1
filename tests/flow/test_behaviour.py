"""The request path's behaviour over every connector (success, errors, cancellation): OpenAI SDK
-> proxy -> simulated prefiller and decoder. Each test runs once per connector (rig.WIRES); what
differs between them is read from the connector's row. Failover: test_failover.py; fan-out:
test_fanout.py; what only LMCache does: test_behaviour_lmcache.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL, Sim, free_port, running, sse_events, start_sim, wait_for
from tests.flow.rig import (
    RECOMPUTED,
    Body,
    Engines,
    LMCacheSetup,
    Receiver,
    Topology,
    direct,
    openai_error,
    post,
    start_proxy_config,
    start_proxy_over,
    start_topology,
    unique,
)
from tests.procs.clients import pinned_clients

CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about KV caches."}]}


def client(topo: Topology, **kw: Any) -> openai.OpenAI:
    """An SDK client of the proxy; closed by its `with` (one left to the garbage collector
    leaves its connection's socket to warn in whichever test the collector runs)."""
    return openai.OpenAI(base_url=topo.url + "/v1", api_key="none", max_retries=0, **kw)


def sdk_completion_text(topo: Topology, body: Body, stream: bool) -> str:
    """A completion's text through the proxy with the OpenAI SDK, streamed or whole."""
    with client(topo) as sdk:
        if stream:
            return "".join(
                c.choices[0].text
                for c in sdk.completions.create(stream=True, **body)  # type: ignore[call-overload]
                if c.choices
            )
        text: str = sdk.completions.create(**body).choices[0].text  # type: ignore[call-overload]
        return text


# -- success ------------------------------------------------------------------------------


@pytest.mark.workers2
def test_sdk_chat_non_stream_equals_direct_and_kv_was_handed_over(pd: Topology) -> None:
    decoder = pd.decode[0]
    with client(pd) as sdk:
        answer = sdk.chat.completions.create(max_tokens=20, **CHAT_BODY)  # type: ignore[call-overload]
    # before the reference request, which may touch the decoder's cache
    assert pd.kv_in(decoder) == 1 and decoder.metric(RECOMPUTED) == 0
    if pd.wire.notifies:
        assert pd.sent() == 1
    reference = direct(decoder, "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 20})
    assert answer.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert answer.usage.completion_tokens == reference["usage"]["completion_tokens"] == 20
    assert answer.usage.prompt_tokens == reference["usage"]["prompt_tokens"]


def check_sdk_chat_stream_with_usage(topo: Topology, kv_handed_over: Callable[[], bool]) -> None:
    """A streamed chat with `max_completion_tokens` and usage, through the SDK: the KV was handed
    over (checked before the reference request, which may touch the decoder's cache), the text
    equals the decoder's own answer, and the usage chunk comes last with the right count."""
    with client(topo) as sdk:
        stream = sdk.chat.completions.create(  # type: ignore[call-overload]
            max_completion_tokens=24, stream=True, stream_options={"include_usage": True},
            **CHAT_BODY,
        )  # fmt: skip
        chunks = list(stream)
    assert kv_handed_over()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reference = direct(
        topo.decode[0], "/v1/chat/completions", {**CHAT_BODY, "max_completion_tokens": 24}
    )
    assert text == reference["choices"][0]["message"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reference["usage"]["completion_tokens"]


def test_sdk_chat_stream_with_usage(pd: Topology) -> None:
    check_sdk_chat_stream_with_usage(pd, lambda: pd.kv_in(pd.decode[0]) == 1)


@pytest.mark.workers2
@pytest.mark.parametrize("stream", [False, True])
def test_sdk_completions(pd: Topology, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16}
    text = sdk_completion_text(pd, body, stream)
    assert pd.kv_in(pd.decode[0]) == 1 and pd.decode[0].metric(RECOMPUTED) == 0
    assert text == direct(pd.decode[0], "/v1/completions", body)["choices"][0]["text"]


@pytest.mark.workers2
def test_bodies_each_leg_received(pd: Topology) -> None:
    """The prefill leg: the client's request capped at one token, not streamed, without what
    the connector must leave out, with the connector's kv_transfer_params exactly; the decode
    leg: the client's request, with what the connector hands over."""
    body = {
        **CHAT_BODY,
        "max_completion_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        "stop": ["zzz"],
        "stop_token_ids": [3],
        "min_tokens": 2,
        "temperature": 0,
    }
    before = pd.notified() if pd.wire.notifies else 0
    resp = post(pd, body, "/v1/chat/completions")
    assert resp.status_code == 200
    if pd.wire.notifies:  # (counted by a serving process: in /metrics with its next report)
        wait_for(lambda: pd.notified() == before + 1)
    [prefill] = pd.prefill[0].generation_records()
    [decode] = pd.decode[0].generation_records()
    wire = pd.wire
    kept = {k: v for k, v in body.items() if k not in wire.prefill_drops}
    assert prefill["body"] == {
        **kept,
        "max_completion_tokens": 1,
        "max_tokens": 1,
        "stream": False,
        "n": 1,
        **wire.prefill_adds,
        "kv_transfer_params": wire.prefill_params(pd, prefill),
    }
    params = decode["body"].pop("kv_transfer_params", None)
    assert decode["body"] == body  # chat stays chat: the client's own request
    wire.check_decode_params(pd, prefill, params)


@pytest.mark.workers2
def test_request_id_on_both_legs_and_echoed(pd: Topology) -> None:
    resp = httpx.post(
        pd.url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
        headers={"X-Request-Id": "client-id-42"},
    )
    assert resp.headers["x-request-id"] == "client-id-42"
    resp = httpx.post(
        pd.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
    )
    generated = resp.headers["x-request-id"]
    assert generated.startswith("pdp-")
    for sim in (pd.prefill[0], pd.decode[0]):
        assert [r["x_request_id"] for r in sim.generation_records()] == ["client-id-42", generated]


def test_prefiller_without_kv_transfer_is_an_immediate_counted_recompute(
    engines: Engines, pd: Topology
) -> None:
    """A prefiller that does no KV transfer: the decoder recomputes at once (no wait for a
    notification that never comes), counted with the connector's reason and logged."""
    plain = start_sim(engines.logs, f"{engines.wire.name}-plain", "--no-kv-transfer")
    with running(plain):
        path = engines.logs / f"{engines.wire.name}-plain.yaml"
        lmcache = f"lmcache: {{notify_port: {free_port()}}}\n"
        path.write_text(
            f"connector: {engines.wire.name}\n"
            + (lmcache if engines.wire.name == "lmcache" else "")
            + f"prefill: ['{plain.url}']\ndecode: ['{pd.decode[0].url}']\n"
        )
        with running(start_proxy_config(engines.logs, path, f"{engines.wire.name}-plain")) as p:
            t0 = time.monotonic()
            resp = httpx.post(
                p.url + "/v1/completions",
                json={"model": MODEL, "prompt": "hello there", "max_tokens": 4},
                timeout=10,
            )
            assert resp.status_code == 200 and time.monotonic() - t0 < 1.0  # no 30 s wait
            reason = engines.wire.no_transfer_reason
            assert p.metrics().total("pdproxy_kv_recompute_total", reason=reason) == 1  # type: ignore[attr-defined]
            assert "will recompute the prompt" in p.log_text()
            assert resp.headers["x-request-id"] in p.log_text()
            assert "kv_transfer_params" not in pd.decode[0].generation_records()[0]["body"]


# -- errors -------------------------------------------------------------------------------


def test_upstream_4xx_passes_through(pd: Topology) -> None:
    resp = post(pd, {"model": "no-such-model", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert "no-such-model" in error["message"]
    pd.decode[0].faults(error_status=422, error_message="bad sampling", count=1)
    resp = post(pd, {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 422 and resp.json()["error"]["message"] == "bad sampling"


@pytest.mark.workers2
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_upstream_5xx_is_502(strict: Topology, role: str) -> None:
    sim = strict.prefill[0] if role == "prefill" else strict.decode[0]
    sim.faults(error_status=500, error_message="engine exploded", count=1)
    resp = post(strict, {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    assert resp.status_code == 502
    message = openai_error(resp)["message"]
    assert "engine exploded" in message and role in message and sim.url in message


def test_garbage_prefill_body_is_502(strict: Topology) -> None:
    strict.prefill[0].faults(garbage_body=True, count=1)
    resp = post(strict, {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 502 and "not JSON" in openai_error(resp)["message"]
    assert strict.prefill[0].url in openai_error(resp)["message"]


@pytest.mark.workers2
def test_timeouts_are_504(strict: Topology) -> None:
    p0, d0 = strict.prefill[0], strict.decode[0]
    p0.faults(stall_seconds=3, count=1)
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    resp = post(strict, body)
    assert resp.status_code == 504 and time.monotonic() - t0 < 2.5
    assert "prefill" in openai_error(resp)["message"]
    d0.faults(stall_seconds=3, count=1)
    resp = post(strict, {**body, "stream": True})
    assert resp.status_code == 504 and "decode" in openai_error(resp)["message"]


def test_no_worker_is_503(engines: Engines) -> None:
    """The only prefiller's breaker opens on its first failure (a 502 naming it); then no
    prefiller is left and, without fallback, the request is refused as unplaceable."""
    config = (
        "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false}\n"
        "health: {interval: 0, failure_threshold: 1, cooldown: 60}\n"
    )
    topo = start_topology(engines, "no-worker", config=config, own_prefillers=1).reset()
    try:
        topo.prefill[0].faults(error_status=500, count=1)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        resp = post(topo, body)
        assert resp.status_code == 502 and topo.prefill[0].url in openai_error(resp)["message"]
        resp = post(topo, body)
        assert resp.status_code == 503
        assert openai_error(resp)["message"] == "no prefill worker is available"
        assert len(topo.prefill[0].generation_records()) == 1
        assert topo.decode[0].generation_records() == []
    finally:
        topo.stop()


def test_dead_worker_is_an_error_naming_it_and_health_says_503(
    engines: Engines, pd: Topology
) -> None:
    """A decoder nobody answers on. Over NIXL the decode leg cannot connect: a 502 naming it.
    Over LMCache the prefiller's push to the dead receiver never completes, so no notification
    comes: a 504 at the notification deadline, which names the decoder too."""
    dead = Sim(f"http://127.0.0.1:{free_port()}", [], None, pd.decode[0].proc)
    rx = Receiver([free_port()], [free_port()]) if engines.wire.name == "lmcache" else None
    notify = free_port()
    prefiller = pd.prefill[0]
    if engines.wire.notifies:  # a prefiller of its own, that notifies this proxy
        prefiller = engines.prefiller("dead-p0", notify, LMCacheSetup())
    proxy = start_proxy_over(
        engines, "dead", [prefiller], [(dead, rx)], "health: {interval: 0}\n", notify
    )

    def check(resp: httpx.Response) -> None:
        message = openai_error(resp)["message"]
        assert dead.url in message
        if engines.wire.notifies:
            assert resp.status_code == 504 and "did not report its LMCache KV transfer" in message
        else:
            assert resp.status_code == 502 and "cannot connect to decode worker" in message

    with running(proxy), running(prefiller) if prefiller not in pd.prefill else nullcontext():
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        check(httpx.post(proxy.url + "/v1/completions", json=body, timeout=30))
        health = httpx.get(proxy.url + "/health")
        assert health.status_code == 503 and health.json()["decode"][0]["health"] == "unhealthy"
        # the only decoder fails its check: the proxy still tries it (panic routing), and says so
        check(httpx.post(proxy.url + "/v1/completions", json=body, timeout=30))
        assert "routing to them anyway" in proxy.log_text()


@pytest.mark.workers2
def test_failure_mid_stream_ends_with_error_event(pd: Topology) -> None:
    pd.decode[0].faults(drop_after_chunks=3, count=1)
    resp = post(pd, {"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and "decode" in events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])
    assert resp.content.count(b"\n\n") == len(events)  # no half event glued to the error


def test_upstream_error_event_is_relayed(pd: Topology) -> None:
    pd.decode[0].faults(error_event_after_chunks=2, count=1)
    resp = post(pd, {"model": MODEL, "prompt": "x", "max_tokens": 30, "stream": True})
    events = sse_events(resp.content)
    assert any(isinstance(e, dict) and "error" in e for e in events)
    assert events[-1] == "[DONE]"


@pytest.mark.workers2
def test_bad_input_gets_4xx_and_proxy_keeps_serving(pd: Topology) -> None:
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
        resp = httpx.post(pd.url + path, content=raw)
        assert resp.status_code == status
        assert words in openai_error(resp)["message"]
    assert httpx.get(pd.url + "/v1/completions").status_code == 405
    assert httpx.get(pd.url + "/nope").json()["error"]["type"] == "NotFoundError"
    assert pd.prefill[0].generation_records() == []
    assert post(pd, {"model": MODEL, "prompt": "a", "max_tokens": 2}).status_code == 200


# -- cancellation -------------------------------------------------------------------------


def _disconnect_after(topo: Topology, body: Body, seconds: float, chunks: int = 0) -> None:
    """Send `body`, then leave after `seconds`, or after reading `chunks` chunks if given."""

    def go() -> None:
        try:
            with httpx.stream(
                "POST", topo.url + "/v1/completions", json=body, timeout=seconds
            ) as r:
                for i, _ in enumerate(r.iter_bytes(), 1):
                    if i == chunks:
                        return  # closing the stream closes the connection
        except httpx.TimeoutException:
            pass  # the client gives up and closes its connection

    thread = threading.Thread(target=go)
    thread.start()
    thread.join()


@pytest.mark.workers2
def test_disconnect_during_prefill_cancels_prefill(pd: Topology) -> None:
    prefiller, decoder = pd.prefill[0], pd.decode[0]
    prefiller.faults(stall_seconds=5, count=1)
    _disconnect_after(pd, {"model": MODEL, "prompt": "x", "max_tokens": 5}, 0.5)
    wait_for(lambda: prefiller.metric("pdsim:aborted_requests_total", phase="prefill") == 1)
    assert decoder.generation_records() == []
    wait_for(
        lambda: pd.proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill") >= 1
    )
    wait_for(lambda: pd.proxy.stats()["workers"]["prefill"][0]["inflight"] == 0)


def test_disconnect_during_decode_closes_decode_stream(pd: Topology) -> None:
    decoder = pd.decode[0]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 16000, "stream": True, "ignore_eos": True}
    _disconnect_after(pd, body, 5, chunks=2)
    wait_for(lambda: decoder.metric("pdsim:aborted_requests_total", phase="decode") == 1)
    wait_for(lambda: pd.proxy.stats()["workers"]["decode"][0]["inflight"] == 0)


@pytest.mark.workers2
def test_client_leaving_after_prefill_aborts_the_decode_leg(pd: Topology) -> None:
    """Prefill done, the decoder stalls before its first byte: a client that leaves is counted
    in the hand-off phase and the decode leg is closed (the decoder aborts the request). What is
    left on the prefiller differs: a NIXL prefiller held the blocks for the pull and frees them
    when the decoder aborts; an LMCache prefiller pushed them while prefilling and holds none."""
    prefiller, decoder = pd.prefill[0], pd.decode[0]
    decoder.faults(stall_seconds=10, count=1)
    rid = f"leaves-after-prefill-{time.monotonic_ns()}"
    before = pd.proxy.metrics().total("pdproxy_client_disconnects_total", phase="handoff")

    def held() -> bool:
        return any(rid in r for r in prefiller.control("GET", "info")["leased_requests"])

    body = json.dumps({"model": MODEL, "prompt": unique("leave after prefill"), "max_tokens": 4})
    host, port = pd.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:  # no answer comes: raw HTTP
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (rid.encode(), len(body), body.encode())
        )
        wait_for(lambda: len(decoder.generation_records()) == 1)
        assert held() is pd.wire.prefiller_holds_kv  # prefill done, the decoder not started
    wait_for(lambda: decoder.metric("pdsim:aborted_requests_total") == 1)
    wait_for(lambda: not held())
    # (a serving process's counters reach /metrics with its next report: waited for)
    metrics = pd.proxy.metrics
    wait_for(
        lambda: metrics().total("pdproxy_client_disconnects_total", phase="handoff") == before + 1
    )
    assert pd.kv_in(decoder) == 0


# -- xPyD -----------------------------------------------------------------------------------


@pytest.mark.workers2
def test_xpyd_least_loaded_spreads(pd_2p2d: Topology) -> None:
    # Only the prefillers stall: a decoder is chosen on arrival and counts the request in flight
    # through its prefill, so both choices see every earlier request while all four are placed.
    # Three requests come on connections of one serving process, the fourth on the other's (with
    # several): that one is placed by what the first process placed.
    clients = [c for group in pinned_clients(pd_2p2d.proxy, [3, 1]) for c in group]
    pd_2p2d.reset()
    for sim in pd_2p2d.prefill:
        sim.faults(stall_seconds=5)
    body = {"model": MODEL, "prompt": "spread me", "max_tokens": 2}
    statuses: list[int] = []

    def one(client: httpx.Client) -> None:
        try:
            statuses.append(client.post("/v1/completions", json=body).status_code)
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(client,)) for client in clients]

    def prefill_inflight() -> int:
        return sum(w["inflight"] for w in pd_2p2d.proxy.stats()["workers"]["prefill"])

    for started, t in enumerate(threads, 1):
        t.start()
        # each request is placed before the next arrives, and none can finish meanwhile
        wait_for(lambda n=started: prefill_inflight() == n)  # type: ignore[misc]
    for t in threads:
        t.join()
    assert statuses == [200] * 4
    counts = [len(s.generation_records()) for s in pd_2p2d.prefill + pd_2p2d.decode]
    assert counts == [2, 2, 2, 2]
    workers = pd_2p2d.proxy.stats()["workers"]
    assert all(w["inflight"] == 0 for role in ("prefill", "decode") for w in workers[role])
