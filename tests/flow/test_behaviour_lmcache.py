"""What only the LMCache connector does on the request path: the prefiller pushes the KV into
the decoder and sends the real `ProxyNotif` over ZMQ to the proxy, which waits for it, with a
deadline. The behaviour both connectors share runs over LMCache in test_behaviour.py,
test_failover.py and test_fanout.py; these tests use the same rig (rig.py), pinned to LMCache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import msgspec
import orjson
import pytest
import zmq

from pdsim.launch import spawn
from tests.conftest import MODEL, free_port, wait_for
from tests.flow.rig import (
    DEADLINE,
    NOTIFICATIONS,
    RECOMPUTED,
    Engines,
    LMCacheSetup,
    Topology,
    post,
    start_topology,
)

pytestmark = pytest.mark.parametrize("connector", ["lmcache"], indirect=True)

HITS = "pdsim:lmcache_hit_requests_total"
NOTES = NOTIFICATIONS
TIMEOUTS = "pdproxy_lmcache_notify_timeouts_total"
WAITING = "pdproxy_lmcache_waiting_requests"


# --- transfer ids and notifications ---


@pytest.mark.workers2
def test_transfer_ids_are_unique_per_request(pd: Topology) -> None:
    for _ in range(3):
        assert post(pd, {"model": MODEL, "prompt": "same prompt", "max_tokens": 2}).is_success
    ids = [
        r["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]
        for r in pd.prefill[0].generation_records()
    ]
    assert len(set(ids)) == 3


@pytest.mark.workers2
def test_concurrent_requests_each_get_their_own_notification(pd: Topology) -> None:
    before = pd.proxy.metrics().total(NOTES, result="matched")
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"concurrent request {i}", "max_tokens": 4}
        statuses.append(post(pd, body).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 24
    # (a serving process's counters reach /metrics with its next report: waited for)
    wait_for(lambda: pd.proxy.metrics().total(NOTES, result="matched") - before == 24)
    assert pd.proxy.metrics().total(WAITING) == 0
    assert pd.decode[0].metric(HITS) == 24 and pd.decode[0].metric(RECOMPUTED) == 0


# --- the deadline: nothing waits forever ---


def test_dropped_notifications_are_504_within_the_deadline(pd: Topology) -> None:
    prefiller = pd.prefill[0]
    before = pd.proxy.metrics()
    prefiller.control("POST", "lmcache", {"drop_notifications": True})
    t0 = time.monotonic()
    resp = post(pd, {"model": MODEL, "prompt": "never notified", "max_tokens": 4, "stream": True})
    elapsed = time.monotonic() - t0
    assert resp.status_code == 504 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (
        error["type"] == "Gateway Timeout"
        and "did not report its LMCache KV transfer" in error["message"]
    )
    assert DEADLINE <= elapsed < DEADLINE + 1.5
    assert pd.decode[0].generation_records() == []  # no decode without the KV
    after = pd.proxy.metrics()
    assert after.total(TIMEOUTS, action="error") - before.total(TIMEOUTS, action="error") == 1
    for name in ("pdproxy_retries_total", "pdproxy_prefill_fallbacks_total"):
        assert after.total(name) == before.total(name)  # a missed notification is not retried
    assert after.total("pdproxy_upstream_failures_total", role="prefill") == before.total(
        "pdproxy_upstream_failures_total", role="prefill"
    )  # nor held against the prefiller
    assert after.total(WAITING) == 0
    assert after.total("pdproxy_lmcache_remembered_ids") >= 1
    prefiller.control("POST", "lmcache", {})
    assert post(pd, {"model": MODEL, "prompt": "notified again", "max_tokens": 4}).is_success


def test_late_and_unknown_notifications_are_dropped(pd: Topology) -> None:
    prefiller = pd.prefill[0]
    before = pd.proxy.metrics()
    prefiller.control("POST", "lmcache", {"delay_notifications": DEADLINE + 0.5})
    resp = post(pd, {"model": MODEL, "prompt": "too slow", "max_tokens": 2})
    assert resp.status_code == 504
    send_lmcache_notification(pd.notify_port, "pdp-lmc-nobody-asked-for-this")
    wait_for(
        lambda: pd.proxy.metrics().total(NOTES, result="late") > before.total(NOTES, result="late")
    )
    wait_for(
        lambda: (
            pd.proxy.metrics().total(NOTES, result="unknown")
            > before.total(NOTES, result="unknown")
        )
    )
    assert pd.proxy.metrics().total(WAITING) == 0


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


def test_proxy_accepts_lmcache_built_notification(pd: Topology) -> None:
    """The prefiller stays silent; the test sends LMCache's own message for the request."""
    prefiller = pd.prefill[0]
    prefiller.control("POST", "lmcache", {"drop_notifications": True})
    result: dict[str, httpx.Response] = {}
    body = {"model": MODEL, "prompt": "notified by the test", "max_tokens": 3}
    thread = threading.Thread(target=lambda: result.setdefault("r", post(pd, body)))
    thread.start()
    wait_for(lambda: len(prefiller.generation_records()) == 1)
    [record] = prefiller.generation_records()
    send_lmcache_notification(
        pd.notify_port, record["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]
    )
    thread.join()
    assert result["r"].status_code == 200
    assert pd.decode[0].metric(HITS) == 1


def test_client_leaving_while_waiting_leaves_nothing_behind(pd: Topology) -> None:
    pd.prefill[0].control("POST", "lmcache", {"drop_notifications": True})
    before = pd.proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            pd.url + "/v1/completions",
            json={"model": MODEL, "prompt": "leaving", "max_tokens": 2},
            timeout=0.5,
        )
    wait_for(
        lambda: (
            pd.proxy.metrics().total("pdproxy_client_disconnects_total", phase="prefill")
            == before + 1
        )
    )
    assert pd.proxy.metrics().total(WAITING) == 0
    wait_for(lambda: pd.proxy.stats()["workers"]["decode"][0]["inflight"] == 0)


# --- fallback, short prompts (LMCache #2510), xPyD, TP 2 ---


def test_short_prompt_never_notifies_and_fallback_recomputes(engines: Engines) -> None:
    setup = LMCacheSetup(
        chunk_size=64,
        proxy_options=", on_timeout: fallback",
        sender_args=("--lmcache-discard-partial-chunks",),
    )
    topo = start_topology(engines, "fallback", lmcache=setup)
    try:
        proxy = topo.proxy
        prefiller, decoder = topo.prefill[0], topo.decode[0]
        topo.reset()
        t0 = time.monotonic()
        resp = post(topo, {"model": MODEL, "prompt": "short", "max_tokens": 5})
        assert resp.status_code == 200 and DEADLINE <= time.monotonic() - t0 < DEADLINE + 1.5
        assert prefiller.metric("pdsim:lmcache_unsaved_requests_total") == 1
        assert prefiller.metric("pdsim:lmcache_notifications_sent_total") == 0
        assert decoder.metric(RECOMPUTED) == 1 and decoder.metric(HITS) == 0
        metrics = proxy.metrics()
        assert metrics.total(TIMEOUTS, action="fallback") == 1
        assert metrics.total("pdproxy_kv_recompute_total", reason="lmcache_notify_timeout") == 1
        assert "will recompute the prompt" in proxy.log_text()
        long_prompt = " ".join(["the cache of a long prompt"] * 20)
        assert post(topo, {"model": MODEL, "prompt": long_prompt, "max_tokens": 5}).is_success
        assert decoder.metric(HITS) == 1
        assert proxy.metrics().total(TIMEOUTS, action="fallback") == 1
    finally:
        topo.stop()


def test_short_prompt_is_504_without_fallback(engines: Engines) -> None:
    setup = LMCacheSetup(chunk_size=256, sender_args=("--lmcache-discard-partial-chunks",))
    topo = start_topology(engines, "2510", lmcache=setup)
    try:
        t0 = time.monotonic()
        resp = post(topo, {"model": MODEL, "prompt": "short", "max_tokens": 5})
        assert resp.status_code == 504 and time.monotonic() - t0 < DEADLINE + 1.5
        assert "shorter than one chunk in 0.3.12-0.4.1" in resp.json()["error"]["message"]
    finally:
        topo.stop()


def test_xpyd_each_decoder_gets_its_own_receiver_ports(pd_2p2d: Topology) -> None:
    ports = {
        d.url: (rx.init_ports, rx.alloc_ports)
        for d, rx in zip(pd_2p2d.decode, pd_2p2d.receivers, strict=True)
    }
    assert len({p for ps in ports.values() for group in ps for p in group}) == 4
    for decoder in pd_2p2d.decode:
        decoder.faults(stall_seconds=5)  # keeps each busy, so least_loaded spreads the load
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"request number {i} of four", "max_tokens": 3}
        statuses.append(post(pd_2p2d, body).status_code)

    def decode_inflight() -> int:
        return sum(w["inflight"] for w in pd_2p2d.proxy.stats()["workers"]["decode"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for started, t in enumerate(threads, 1):
        t.start()
        wait_for(lambda n=started: decode_inflight() == n)  # type: ignore[misc]
    for t in threads:
        t.join()
    assert statuses == [200] * 4
    specs = {}
    for sim in pd_2p2d.prefill:
        for record in sim.generation_records():
            kv = record["body"]["kv_transfer_params"]
            specs[record["x_request_id"]] = kv["disagg_spec"]
    served = 0
    for decoder in pd_2p2d.decode:
        for record in decoder.generation_records():
            spec = specs[record["x_request_id"]]
            assert (spec["receiver_init_port"], spec["receiver_alloc_port"]) == ports[decoder.url]
            served += 1
        assert decoder.metric(HITS) == len(decoder.generation_records())
        assert decoder.metric(RECOMPUTED) == 0
    assert served == 4 and all(d.generation_records() for d in pd_2p2d.decode)


def test_tp2_decoder_needs_both_notifications(engines: Engines) -> None:
    topo = start_topology(engines, "tp2", lmcache=LMCacheSetup(tp=2))
    try:
        topo.reset()
        proxy = topo.proxy
        assert post(topo, {"model": MODEL, "prompt": "two ranks", "max_tokens": 3}).is_success
        [record] = topo.prefill[0].generation_records()
        spec = record["body"]["kv_transfer_params"]["disagg_spec"]
        assert spec["receiver_init_port"] == topo.receivers[0].init_ports  # two ports each
        assert spec["receiver_alloc_port"] == topo.receivers[0].alloc_ports
        assert len(spec["receiver_init_port"]) == 2
        assert proxy.metrics().total(NOTES, result="matched") == 2
        assert topo.decode[0].metric(HITS) == 1
        topo.prefill[0].control("POST", "lmcache", {"drop_ranks": [1]})  # rank 1 stays silent
        t0 = time.monotonic()
        resp = post(topo, {"model": MODEL, "prompt": "one rank only", "max_tokens": 3})
        assert resp.status_code == 504 and time.monotonic() - t0 < DEADLINE + 1.5
        assert "got 1 of 2 notifications" in resp.json()["error"]["message"]
        assert proxy.metrics().total(NOTES, result="matched") == 3
    finally:
        topo.stop()


def test_metrics_and_stats_name_the_connector(pd: Topology) -> None:
    assert pd.proxy.stats()["connector"] == "lmcache"
    text = httpx.get(pd.url + "/metrics").text
    for name in (NOTES.removesuffix("_total"), TIMEOUTS.removesuffix("_total"), WAITING):
        assert f"# TYPE {name}" in text
    assert orjson.loads(httpx.get(pd.url + "/health").content)["status"] == "ok"


def test_second_proxy_on_the_same_notification_port_fails_clearly(pd: Topology, logs: Path) -> None:
    config = logs / "lmc-clash.yaml"
    config.write_text(
        f"connector: lmcache\nlmcache: {{notify_port: {pd.notify_port}}}\n"
        f"prefill: ['{pd.prefill[0].url}']\ndecode: ['{pd.decode[0].url}']\n"
    )
    port = free_port()
    with pytest.raises(RuntimeError, match="cannot bind the LMCache notification socket"):
        spawn(
            ["serve", "--port", str(port), "--stats-interval", "0", "--config", str(config)],
            f"http://127.0.0.1:{port}",
            logs / "lmc-clash-proxy.log",
            ready_path="/metrics",
        )
