"""The request path over the LMCache connector: OpenAI SDK -> proxy -> simulated LMCache engines.

Prefillers run as LMCache senders (they push KV to the decoder named in `disagg_spec` and send the
real `ProxyNotif` over ZMQ to the proxy), decoders as receivers. The connector-agnostic behaviour
tests of `tests/serve/test_endpoint.py` are imported below and run here a second time, with this
module's `proxy` / `proxy_2p2d` fixtures (LMCache) in place of the conftest's (NIXL).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
import zmq

from pdsim.launch import spawn
from tests.conftest import MODEL, Proxy, Sim, free_port, start_sim, wait_for
from tests.serve.test_endpoint import (  # noqa: F401 - collected again here, over LMCache
    CHAT_BODY,
    check_sdk_chat_stream_with_usage,
    client,
    direct,
    sdk_completion_text,
    test_bad_input_gets_4xx_and_proxy_keeps_serving,
    test_disconnect_during_decode_closes_decode_stream,
    test_disconnect_during_prefill_cancels_prefill,
    test_failure_mid_stream_ends_with_error_event,
    test_garbage_prefill_body_is_502,
    test_request_id_on_both_legs_and_echoed,
    test_timeouts_are_504,
    test_upstream_4xx_passes_through,
    test_upstream_5xx_is_502,
    test_upstream_error_event_is_relayed,
    test_xpyd_least_loaded_spreads,
)

HITS = "pdsim:lmcache_hit_requests_total"
RECOMPUTED = "pdsim:recomputed_requests_total"
NOTES = "pdproxy_lmcache_notifications_total"
TIMEOUTS = "pdproxy_lmcache_notify_timeouts_total"
WAITING = "pdproxy_lmcache_waiting_requests"
DEADLINE = 1.5  # lmcache.notify_timeout of the rigs, seconds


@dataclass
class Decoder:
    init_ports: list[int]
    alloc_ports: list[int]


@dataclass
class Rig:
    """LMCache senders and receivers, and the one proxy their notifications go to."""

    proxy: Proxy
    notify_port: int
    receivers: list[Decoder] = field(default_factory=list)

    def sims(self) -> list[Sim]:
        return self.proxy.prefill + self.proxy.decode

    def reset(self) -> None:
        for sim in self.sims():
            sim.reset()
            sim.control("POST", "lmcache", {})

    def stop(self) -> None:
        self.proxy.stop()
        for sim in self.sims():
            sim.stop()


def start_rig(
    logs: Path,
    name: str,
    prefillers: int = 1,
    decoders: int = 1,
    tp: int = 1,
    chunk_size: int = 2,
    proxy_yaml: str = "",
    extra_yaml: str = "",
    sender_args: tuple[str, ...] = (),
) -> Rig:
    """Start sims and a proxy (`connector: lmcache`, each decoder with its own fresh ports)."""
    notify = free_port()
    common = ["--speed-factor", "0.05", "--tp", str(tp), "--lmcache-chunk-size", str(chunk_size)]
    started: list[Sim] = []
    try:
        receivers = []
        for i in range(decoders):
            rx = Decoder([free_port() for _ in range(tp)], [free_port() for _ in range(tp)])
            receivers.append(rx)
            started.append(
                start_sim(
                    logs,
                    f"{name}-d{i}",
                    "--lmcache-role",
                    "receiver",
                    "--pd-peer-init-port",
                    ",".join(map(str, rx.init_ports)),
                    "--pd-peer-alloc-port",
                    ",".join(map(str, rx.alloc_ports)),
                    *common,
                    role="decode",
                )
            )
        for i in range(prefillers):
            started.append(
                start_sim(
                    logs,
                    f"{name}-p{i}",
                    "--lmcache-role",
                    "sender",
                    "--pd-proxy-port",
                    str(notify),
                    *common,
                    *sender_args,
                    role="prefill",
                )
            )
        decode, prefill = started[:decoders], started[decoders:]
        lines = [
            "connector: lmcache",
            f"lmcache: {{notify_port: {notify}, notify_timeout: {DEADLINE}{proxy_yaml}}}",
            "prefill: [" + ", ".join(s.url for s in prefill) + "]",
            "decode:",
        ]
        for sim, rx in zip(decode, receivers, strict=True):
            lines.append(
                f"  - {{url: '{sim.url}', lmcache: {{init_ports: {rx.init_ports}, "
                f"alloc_ports: {rx.alloc_ports}}}}}"
            )
        config = logs / f"{name}.yaml"
        config.write_text("\n".join(lines) + "\n" + extra_yaml)
        port = free_port()
        cmd = ["serve", "--port", str(port), "--stats-interval", "0", "--config", str(config)]
        s = spawn(
            cmd, f"http://127.0.0.1:{port}", logs / f"{name}-proxy.log", ready_path="/metrics"
        )
    except BaseException:
        for sim in started:
            sim.stop()
        raise
    return Rig(Proxy(s.url, s.args, s.log, s.proc, prefill, decode), notify, receivers)


@pytest.fixture(scope="module")
def rig(logs: Path) -> Iterator[Rig]:
    r = start_rig(logs, "lmc-1p1d")
    yield r
    r.stop()


@pytest.fixture
def proxy(rig: Rig) -> Proxy:
    """Overrides the conftest's NIXL proxy: a 1p1d LMCache proxy over reset sims."""
    rig.reset()
    return rig.proxy


@pytest.fixture(scope="module")
def rig_2p2d(logs: Path) -> Iterator[Rig]:
    r = start_rig(logs, "lmc-2p2d", prefillers=2, decoders=2)
    yield r
    r.stop()


@pytest.fixture
def proxy_2p2d(rig_2p2d: Rig) -> Proxy:
    rig_2p2d.reset()
    return rig_2p2d.proxy


@pytest.fixture(scope="module")
def strict_rig(logs: Path) -> Iterator[Rig]:
    r = start_rig(
        logs,
        "lmc-strict",
        extra_yaml=(
            "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false}\n"
            "timeouts: {prefill: 0.5, decode_first_byte: 0.5, decode_idle: 0.5}\n"
            "health: {interval: 0}\n"
        ),
    )
    yield r
    r.stop()


@pytest.fixture
def strict_proxy(strict_rig: Rig) -> Proxy:
    """Overrides test_handler's: 1p1d LMCache with failover off."""
    return strict_rig.proxy


@pytest.fixture
def clean_sims(strict_rig: Rig) -> dict[str, Sim]:
    """Overrides the conftest's: the sims behind `strict_proxy`, reset."""
    strict_rig.reset()
    return {"p0": strict_rig.proxy.prefill[0], "d0": strict_rig.proxy.decode[0]}


def post(proxy: Proxy, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, timeout=10)


# --- the same behaviour as NIXL, with LMCache's proof that the KV travelled ---


def test_sdk_chat_non_stream_equals_direct_and_kv_was_pushed(proxy: Proxy) -> None:
    decoder = proxy.decode[0]
    answer = client(proxy).chat.completions.create(max_tokens=20, **CHAT_BODY)  # type: ignore[call-overload]
    assert decoder.metric(HITS) == 1 and decoder.metric(RECOMPUTED) == 0
    assert proxy.prefill[0].metric("pdsim:lmcache_notifications_sent_total") == 1
    reference = direct(decoder, "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 20})
    assert answer.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert answer.usage.completion_tokens == reference["usage"]["completion_tokens"] == 20
    assert answer.usage.prompt_tokens == reference["usage"]["prompt_tokens"]


def test_sdk_chat_stream_with_usage_sends_only_max_completion_tokens(proxy: Proxy) -> None:
    check_sdk_chat_stream_with_usage(proxy, lambda: proxy.decode[0].metric(HITS) == 1)


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_completions(proxy: Proxy, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 16}
    text = sdk_completion_text(proxy, body, stream)
    assert proxy.decode[0].metric(HITS) == 1 and proxy.decode[0].metric(RECOMPUTED) == 0
    assert text == direct(proxy.decode[0], "/v1/completions", body)["choices"][0]["text"]


def test_bodies_each_leg_received(rig: Rig, proxy: Proxy) -> None:
    body = {
        **CHAT_BODY,
        "max_completion_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
        "temperature": 0,
    }
    resp = post(proxy, body, "/v1/chat/completions")
    assert resp.status_code == 200
    [prefill] = proxy.prefill[0].generation_records()
    [decode] = proxy.decode[0].generation_records()
    spec = prefill["body"]["kv_transfer_params"]["disagg_spec"]
    assert spec["req_id"].startswith("pdp-lmc-") and len(spec["req_id"]) == 40
    assert prefill["body"] == {
        "model": MODEL,
        "messages": CHAT_BODY["messages"],
        "tools": body["tools"],
        "max_completion_tokens": 1,
        "max_tokens": 1,
        "stream": False,
        "temperature": 0,
        "n": 1,
        "kv_transfer_params": {
            "ret_first_tok": True,
            "disagg_spec": {
                "req_id": spec["req_id"],
                "receiver_host": "127.0.0.1",
                "receiver_init_port": rig.receivers[0].init_ports,
                "receiver_alloc_port": rig.receivers[0].alloc_ports,
            },
        },
    }
    assert decode["body"] == body  # chat stays chat: the client's own request
    assert proxy.metrics().total(NOTES, result="matched") >= 1


def test_transfer_ids_are_unique_per_request(proxy: Proxy) -> None:
    for _ in range(3):
        assert post(proxy, {"model": MODEL, "prompt": "same prompt", "max_tokens": 2}).is_success
    ids = [
        r["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]
        for r in proxy.prefill[0].generation_records()
    ]
    assert len(set(ids)) == 3


def test_concurrent_requests_each_get_their_own_notification(proxy: Proxy) -> None:
    before = proxy.metrics().total(NOTES, result="matched")
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"concurrent request {i}", "max_tokens": 4}
        statuses.append(post(proxy, body).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 24
    metrics = proxy.metrics()
    assert metrics.total(NOTES, result="matched") - before == 24
    assert metrics.total(WAITING) == 0
    assert proxy.decode[0].metric(HITS) == 24 and proxy.decode[0].metric(RECOMPUTED) == 0


def test_prompt_list_and_n_fan_out_one_transfer_each(proxy: Proxy) -> None:
    """Over LMCache too, each completion of a batch is a prefill leg and a pushed KV of its own,
    merged as the decoder merges the same batch."""
    before = proxy.metrics().total(NOTES, result="matched")
    body = {"model": MODEL, "prompt": ["The quick brown fox", "concurrent request x"],
            "max_tokens": 6, "n": 2, "seed": 5}  # fmt: skip
    resp = post(proxy, body)
    assert resp.status_code == 200
    assert proxy.metrics().total(NOTES, result="matched") - before == 4
    assert proxy.decode[0].metric(HITS) == 4 and proxy.decode[0].metric(RECOMPUTED) == 0
    want = direct(proxy.decode[0], "/v1/completions", body)
    assert [c["text"] for c in resp.json()["choices"]] == [c["text"] for c in want["choices"]]
    assert resp.json()["usage"] == want["usage"]


# --- the deadline: nothing waits forever ---


def test_dropped_notifications_are_504_within_the_deadline(proxy: Proxy) -> None:
    prefiller = proxy.prefill[0]
    before = proxy.metrics()
    prefiller.control("POST", "lmcache", {"drop_notifications": True})
    t0 = time.monotonic()
    resp = post(
        proxy, {"model": MODEL, "prompt": "never notified", "max_tokens": 4, "stream": True}
    )
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (
        error["type"] == "Gateway Timeout"
        and "did not report its LMCache KV transfer" in error["message"]
    )
    assert DEADLINE <= elapsed < DEADLINE + 1.5
    assert proxy.decode[0].generation_records() == []  # no decode without the KV
    after = proxy.metrics()
    assert after.total(TIMEOUTS, action="error") - before.total(TIMEOUTS, action="error") == 1
    for name in ("pdproxy_retries_total", "pdproxy_prefill_fallbacks_total"):
        assert after.total(name) == before.total(name)  # a missed notification is not retried
    assert after.total("pdproxy_upstream_failures_total", role="prefill") == before.total(
        "pdproxy_upstream_failures_total", role="prefill"
    )  # nor held against the prefiller
    assert after.total(WAITING) == 0
    assert after.total("pdproxy_lmcache_remembered_ids") >= 1
    prefiller.control("POST", "lmcache", {})
    assert post(proxy, {"model": MODEL, "prompt": "notified again", "max_tokens": 4}).is_success


def test_late_and_unknown_notifications_are_dropped(rig: Rig, proxy: Proxy) -> None:
    prefiller = proxy.prefill[0]
    before = proxy.metrics()
    prefiller.control("POST", "lmcache", {"delay_notifications": DEADLINE + 0.5})
    resp = post(proxy, {"model": MODEL, "prompt": "too slow", "max_tokens": 2})
    assert resp.status_code == 504
    send_lmcache_notification(rig.notify_port, "pdp-lmc-nobody-asked-for-this")
    wait_for(
        lambda: proxy.metrics().total(NOTES, result="late") > before.total(NOTES, result="late")
    )
    wait_for(
        lambda: (
            proxy.metrics().total(NOTES, result="unknown") > before.total(NOTES, result="unknown")
        )
    )
    assert proxy.metrics().total(WAITING) == 0


def send_lmcache_notification(port: int, req_id: str) -> None:
    """Send `ProxyNotif` built with msgspec exactly as LMCache's pd_backend builds it."""

    class PDMsgBase(msgspec.Struct, tag=True):
        pass

    class ProxyNotif(PDMsgBase):
        req_id: str

    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(msgspec.msgpack.encode(ProxyNotif(req_id=req_id)))
    finally:
        sock.close(linger=1000)
        context.term()


def test_proxy_accepts_lmcache_built_notification(rig: Rig, proxy: Proxy) -> None:
    """The prefiller stays silent; the test sends LMCache's own message for the request."""
    prefiller = proxy.prefill[0]
    prefiller.control("POST", "lmcache", {"drop_notifications": True})
    result: dict[str, httpx.Response] = {}
    body = {"model": MODEL, "prompt": "notified by the test", "max_tokens": 3}
    thread = threading.Thread(target=lambda: result.setdefault("r", post(proxy, body)))
    thread.start()
    wait_for(lambda: len(prefiller.generation_records()) == 1)
    [record] = prefiller.generation_records()
    send_lmcache_notification(
        rig.notify_port, record["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]
    )
    thread.join()
    assert result["r"].status_code == 200
    assert proxy.decode[0].metric(HITS) == 1


def test_client_leaving_while_waiting_leaves_nothing_behind(proxy: Proxy) -> None:
    proxy.prefill[0].control("POST", "lmcache", {"drop_notifications": True})
    before = proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            proxy.url + "/v1/completions",
            json={"model": MODEL, "prompt": "leaving", "max_tokens": 2},
            timeout=0.5,
        )
    wait_for(
        lambda: (
            proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill") == before + 1
        )
    )
    assert proxy.metrics().total(WAITING) == 0
    wait_for(lambda: proxy.stats()["workers"]["decode"][0]["inflight"] == 0)


def test_prefiller_without_lmcache_is_an_immediate_counted_recompute(rig: Rig, logs: Path) -> None:
    plain = start_sim(logs, "lmc-plain", "--no-kv-transfer")
    try:
        config = logs / "lmc-plain.yaml"
        config.write_text(
            f"connector: lmcache\nlmcache: {{notify_port: {free_port()}}}\n"
            f"prefill: ['{plain.url}']\ndecode: ['{rig.proxy.decode[0].url}']\n"
        )
        port = free_port()
        s = spawn(
            ["serve", "--port", str(port), "--stats-interval", "0", "--config", str(config)],
            f"http://127.0.0.1:{port}",
            logs / "lmc-plain-proxy.log",
            ready_path="/metrics",
        )
        try:
            t0 = time.monotonic()
            resp = httpx.post(
                s.url + "/v1/completions",
                json={"model": MODEL, "prompt": "hello there", "max_tokens": 4},
                timeout=10,
            )
            assert resp.status_code == 200 and time.monotonic() - t0 < 1.0  # no 30 s wait
            metrics = httpx.get(s.url + "/metrics").text
            assert 'pdproxy_kv_recompute_total{reason="missing_params"} 1.0' in metrics
        finally:
            s.stop()
    finally:
        plain.stop()


# --- fallback, short prompts (LMCache #2510), xPyD, TP 2 ---


@pytest.fixture(scope="module")
def fallback_rig(logs: Path) -> Iterator[Rig]:
    r = start_rig(
        logs,
        "lmc-fallback",
        chunk_size=64,
        proxy_yaml=", on_timeout: fallback",
        sender_args=("--lmcache-discard-partial-chunks",),
    )
    yield r
    r.stop()


def test_short_prompt_never_notifies_and_fallback_recomputes(fallback_rig: Rig) -> None:
    fallback_rig.reset()
    proxy = fallback_rig.proxy
    prefiller, decoder = proxy.prefill[0], proxy.decode[0]
    t0 = time.monotonic()
    resp = post(proxy, {"model": MODEL, "prompt": "short", "max_tokens": 5})
    assert resp.status_code == 200 and DEADLINE <= time.monotonic() - t0 < DEADLINE + 1.5
    assert prefiller.metric("pdsim:lmcache_unsaved_requests_total") == 1
    assert prefiller.metric("pdsim:lmcache_notifications_sent_total") == 0
    assert decoder.metric(RECOMPUTED) == 1 and decoder.metric(HITS) == 0
    metrics = proxy.metrics()
    assert metrics.total(TIMEOUTS, action="fallback") == 1
    assert metrics.total("pdproxy_kv_recompute_total", reason="lmcache_notify_timeout") == 1
    assert "will recompute the prompt" in proxy.log_text()
    long_prompt = " ".join(["the cache of a long prompt"] * 20)
    assert post(proxy, {"model": MODEL, "prompt": long_prompt, "max_tokens": 5}).is_success
    assert decoder.metric(HITS) == 1
    assert proxy.metrics().total(TIMEOUTS, action="fallback") == 1


def test_short_prompt_is_504_without_fallback(logs: Path) -> None:
    r = start_rig(
        logs, "lmc-2510", chunk_size=256, sender_args=("--lmcache-discard-partial-chunks",)
    )
    try:
        t0 = time.monotonic()
        resp = post(r.proxy, {"model": MODEL, "prompt": "short", "max_tokens": 5})
        assert resp.status_code == 504 and time.monotonic() - t0 < DEADLINE + 1.5
        assert "shorter than one chunk in 0.3.12-0.4.1" in resp.json()["error"]["message"]
    finally:
        r.stop()


def test_xpyd_each_decoder_gets_its_own_receiver_ports(rig_2p2d: Rig, proxy_2p2d: Proxy) -> None:
    ports = {
        d.url: (rx.init_ports, rx.alloc_ports)
        for d, rx in zip(proxy_2p2d.decode, rig_2p2d.receivers, strict=True)
    }
    assert len({p for ps in ports.values() for group in ps for p in group}) == 4
    for decoder in proxy_2p2d.decode:
        decoder.faults(stall_seconds=5)  # keeps each busy, so least_loaded spreads the load
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"request number {i} of four", "max_tokens": 3}
        statuses.append(post(proxy_2p2d, body).status_code)

    def decode_inflight() -> int:
        return sum(w["inflight"] for w in proxy_2p2d.stats()["workers"]["decode"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for started, t in enumerate(threads, 1):
        t.start()
        wait_for(lambda n=started: decode_inflight() == n)  # type: ignore[misc]
    for t in threads:
        t.join()
    assert statuses == [200] * 4
    specs = {}
    for sim in proxy_2p2d.prefill:
        for record in sim.generation_records():
            kv = record["body"]["kv_transfer_params"]
            specs[record["x_request_id"]] = kv["disagg_spec"]
    served = 0
    for decoder in proxy_2p2d.decode:
        for record in decoder.generation_records():
            spec = specs[record["x_request_id"]]
            assert (spec["receiver_init_port"], spec["receiver_alloc_port"]) == ports[decoder.url]
            served += 1
        assert decoder.metric(HITS) == len(decoder.generation_records())
        assert decoder.metric(RECOMPUTED) == 0
    assert served == 4 and all(d.generation_records() for d in proxy_2p2d.decode)


def test_tp2_decoder_needs_both_notifications(logs: Path) -> None:
    r = start_rig(logs, "lmc-tp2", tp=2)
    try:
        r.reset()
        proxy = r.proxy
        assert post(proxy, {"model": MODEL, "prompt": "two ranks", "max_tokens": 3}).is_success
        [record] = proxy.prefill[0].generation_records()
        spec = record["body"]["kv_transfer_params"]["disagg_spec"]
        assert spec["receiver_init_port"] == r.receivers[0].init_ports  # two ports each
        assert spec["receiver_alloc_port"] == r.receivers[0].alloc_ports
        assert len(spec["receiver_init_port"]) == 2
        assert proxy.metrics().total(NOTES, result="matched") == 2
        assert proxy.decode[0].metric(HITS) == 1
        proxy.prefill[0].control("POST", "lmcache", {"drop_ranks": [1]})  # rank 1 stays silent
        t0 = time.monotonic()
        resp = post(proxy, {"model": MODEL, "prompt": "one rank only", "max_tokens": 3})
        assert resp.status_code == 504 and time.monotonic() - t0 < DEADLINE + 1.5
        assert "got 1 of 2 notifications" in resp.json()["error"]["message"]
        assert proxy.metrics().total(NOTES, result="matched") == 3
    finally:
        r.stop()


def test_metrics_and_stats_name_the_connector(proxy: Proxy) -> None:
    assert proxy.stats()["connector"] == "lmcache"
    text = httpx.get(proxy.url + "/metrics").text
    for name in (NOTES.removesuffix("_total"), TIMEOUTS.removesuffix("_total"), WAITING):
        assert f"# TYPE {name}" in text
    assert orjson.loads(httpx.get(proxy.url + "/health").content)["status"] == "ok"


def test_second_proxy_on_the_same_notification_port_fails_clearly(rig: Rig, logs: Path) -> None:
    config = logs / "lmc-clash.yaml"
    config.write_text(
        f"connector: lmcache\nlmcache: {{notify_port: {rig.notify_port}}}\n"
        f"prefill: ['{rig.proxy.prefill[0].url}']\ndecode: ['{rig.proxy.decode[0].url}']\n"
    )
    port = free_port()
    with pytest.raises(RuntimeError, match="cannot bind the LMCache notification socket"):
        spawn(
            ["serve", "--port", str(port), "--stats-interval", "0", "--config", str(config)],
            f"http://127.0.0.1:{port}",
            logs / "lmc-clash-proxy.log",
            ready_path="/metrics",
        )
