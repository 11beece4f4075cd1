"""Failover, health and cancellation on the request path (2 prefillers, 2 decoders)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, running, sse_events, start_proxy, wait_for

PULLS = "vllm:nixl_xfer_time_seconds_count"
BODY = {"model": MODEL, "prompt": "fail me over", "max_tokens": 4}


def start_2p2d(logs: Path, sims: dict[str, Sim]) -> Proxy:
    """2p2d, quick health checks, breaker after 2 failures with a 1 s cool-down."""
    config = logs / "failover.yaml"
    config.write_text(
        "health: {interval: 0.2, timeout: 1, failure_threshold: 2, cooldown: 1}\n"
        "timeouts: {prefill: 2, decode_first_byte: 2, decode_idle: 2}\n"
    )
    return start_proxy(
        logs,
        [sims["p0"], sims["p1"]],
        [sims["d0"], sims["d1"]],
        "--config",
        str(config),
        name="failover",
    )


@pytest.fixture(scope="module")
def pd(logs: Path, sims: dict[str, Sim]) -> Iterator[Proxy]:
    with running(start_2p2d(logs, sims)) as proxy:
        yield proxy  # type: ignore[misc]


@pytest.fixture
def fresh(pd: Proxy, clean_sims: dict[str, Sim]) -> Proxy:
    wait_for(
        lambda: all(w["available"] for r in ("prefill", "decode") for w in pd.stats()["workers"][r])
    )
    return pd


def test_prefill_failure_is_retried_on_another_prefiller(fresh: Proxy) -> None:
    p0, p1 = fresh.prefill
    p0.faults(error_status=503, count=1)
    before = fresh.metrics().total("pdproxy_retries_total", role="prefill")
    resp = httpx.post(fresh.url + "/v1/completions", json=BODY)
    assert resp.status_code == 200
    assert len(p0.generation_records()) == 1 and len(p1.generation_records()) == 1
    assert fresh.metrics().total("pdproxy_retries_total", role="prefill") == before + 1
    assert sum(d.metric(PULLS) for d in fresh.decode) == 1  # the KV from p1 was pulled


def test_no_prefiller_left_falls_back_to_decoder_prefill(fresh: Proxy) -> None:
    for p in fresh.prefill:
        p.faults(error_status=500, count=1)
    before = fresh.metrics().total("pdproxy_prefill_fallbacks_total", reason="prefill_failed")
    resp = httpx.post(fresh.url + "/v1/completions", json=BODY)
    assert resp.status_code == 200
    after = fresh.metrics().total("pdproxy_prefill_fallbacks_total", reason="prefill_failed")
    assert after == before + 1
    [decode] = [r for d in fresh.decode for r in d.generation_records()]
    assert "kv_transfer_params" not in decode["body"] and decode["kv"] == "local"


def test_client_errors_are_never_retried(fresh: Proxy) -> None:
    p0, p1 = fresh.prefill
    p0.faults(error_status=400, error_message="bad temperature", count=1)
    resp = httpx.post(fresh.url + "/v1/completions", json=BODY)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "bad temperature"
    assert p1.generation_records() == []
    assert all(d.generation_records() == [] for d in fresh.decode)


def test_decode_failure_before_first_byte_moves_to_another_decoder(fresh: Proxy) -> None:
    d0, d1 = fresh.decode
    d0.faults(error_status=500, count=1)
    resp = httpx.post(fresh.url + "/v1/completions", json={**BODY, "stream": True})
    assert resp.status_code == 200 and sse_events(resp.content)[-1] == "[DONE]"
    [first] = d0.generation_records()
    [second] = d1.generation_records()
    assert first["body"]["kv_transfer_params"] == second["body"]["kv_transfer_params"]
    assert d1.metric(PULLS) == 1  # the second decoder pulled the same KV
    assert fresh.metrics().total("pdproxy_retries_total", role="decode") >= 1


def test_nothing_is_retried_once_bytes_reached_the_client(fresh: Proxy) -> None:
    d0, d1 = fresh.decode
    d0.faults(drop_after_chunks=2, count=1)
    resp = httpx.post(
        fresh.url + "/v1/completions", json={**BODY, "max_tokens": 20, "stream": True}
    )
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert d1.generation_records() == []


def test_unhealthy_worker_gets_no_traffic(fresh: Proxy) -> None:
    d0, d1 = fresh.decode
    d0.faults(unhealthy=True)
    wait_for(lambda: not fresh.stats()["workers"]["decode"][0]["available"])
    for _ in range(4):
        assert httpx.post(fresh.url + "/v1/completions", json=BODY).status_code == 200
    assert d0.generation_records() == [] and len(d1.generation_records()) == 4
    d0.reset()
    wait_for(lambda: fresh.stats()["workers"]["decode"][0]["available"])


def test_breaker_opens_then_half_open_trial_closes_it(
    logs: Path, clean_sims: dict[str, Sim]
) -> None:
    with running(start_2p2d(logs, clean_sims)) as proxy:
        _breaker_scenario(proxy)  # type: ignore[arg-type]


def _breaker_scenario(fresh: Proxy) -> None:
    d0 = fresh.decode[0]
    d0.faults(error_status=500, count=2)
    for _ in range(2):  # each fails on d0, is retried on d1
        assert httpx.post(fresh.url + "/v1/completions", json=BODY).status_code == 200
    state = fresh.stats()["workers"]["decode"][0]
    assert state["breaker"] == "open" and not state["available"]
    assert httpx.post(fresh.url + "/v1/completions", json=BODY).status_code == 200
    assert len(d0.generation_records()) == 2  # no traffic while open
    time.sleep(1.1)  # cool-down: the next request is the trial, and d0 has recovered
    assert httpx.post(fresh.url + "/v1/completions", json=BODY).status_code == 200
    assert len(d0.generation_records()) == 3
    assert fresh.stats()["workers"]["decode"][0]["breaker"] == "closed"


def test_idle_decoder_mid_stream_ends_with_timeout_event(fresh: Proxy) -> None:
    d0, _ = fresh.decode
    d0.faults(stall_seconds=4, stall_after_chunks=2, count=1)
    t0 = time.monotonic()
    resp = httpx.post(
        fresh.url + "/v1/completions", json={**BODY, "max_tokens": 20, "stream": True}
    )
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]" and "did not answer in time" in events[-2]["error"]["message"]
    assert time.monotonic() - t0 < 3.5


def test_client_leaving_after_prefill_frees_the_prefillers_kv(fresh: Proxy) -> None:
    """Prefill done, decoder not yet pulled: closing the decode leg makes the decoder release
    the prefiller's blocks (as vLLM's decoder notifies on abort) instead of pinning them for the
    whole lease."""
    for decoder in fresh.decode:  # wherever it goes, the decoder has it but has not pulled yet
        decoder.faults(stall_seconds=10, count=1)
    rid = f"leaves-after-prefill-{time.monotonic_ns()}"

    def leased() -> bool:  # by request id: leases left by earlier tests do not count
        return any(
            any(rid in r for r in p.control("GET", "info")["leased_requests"])
            for p in fresh.prefill
        )

    body = json.dumps(BODY).encode()
    host, port = fresh.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (rid.encode(), len(body), body)
        )
        wait_for(leased, timeout=10)  # prefill done, the KV waits for the decoder
    # the client left, the decoder's stall is far from over, and the lease is 30 s: released
    wait_for(lambda: not leased(), timeout=5)
    assert fresh.metrics().total("pdproxy_client_disconnects_total", phase="handoff") >= 1
    assert sum(d.metric(PULLS) for d in fresh.decode) == 0


def _stream_in_thread(url: str, body: dict[str, Any], out: list[bytes]) -> threading.Thread:
    def go() -> None:
        out.append(httpx.post(url + "/v1/completions", json=body, timeout=20).content)

    thread = threading.Thread(target=go)
    thread.start()
    return thread


@pytest.mark.parametrize(("drain", "stall", "complete"), [(5, 1.0, True), (0.5, 4.0, False)])
def test_sigterm_drains_in_flight_streams(
    logs: Path, clean_sims: dict[str, Sim], drain: float, stall: float, complete: bool
) -> None:
    config = logs / f"drain-{drain}.yaml"
    config.write_text(f"drain_timeout: {drain}\nhealth: {{interval: 0}}\n")
    proxy = start_proxy(
        logs, [clean_sims["p0"]], [clean_sims["d0"]], "--config", str(config), name="drain"
    )
    with running(proxy):
        clean_sims["d0"].faults(stall_seconds=stall, stall_after_chunks=2, count=1)
        out: list[bytes] = []
        thread = _stream_in_thread(proxy.url, {**BODY, "max_tokens": 8, "stream": True}, out)
        wait_for(lambda: proxy.stats()["workers"]["decode"][0]["inflight"] == 1)
        time.sleep(0.2)
        os.killpg(proxy.proc.pid, signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(proxy.url + "/health", timeout=1)
            except httpx.ConnectError:
                return True
            except httpx.TransportError:  # accepted just before the listener closed: again
                return False
            return False

        wait_for(refused)  # no longer accepting, while the stream goes on
        thread.join()
        events = sse_events(out[0])
        assert events[-1] == "[DONE]"
        if complete:
            assert not any("error" in e for e in events if isinstance(e, dict))
        else:
            assert "shut down" in events[-2]["error"]["message"]
        assert proxy.proc.wait(timeout=10) is not None


@pytest.mark.parametrize("stream", [True, False])
def test_garbage_from_a_decoder_is_caught_and_failed_over(fresh: Proxy, stream: bool) -> None:
    d0, d1 = fresh.decode
    d0.faults(garbage_body=True, count=1)
    resp = httpx.post(fresh.url + "/v1/completions", json={**BODY, "stream": stream})
    assert resp.status_code == 200
    if stream:
        assert sse_events(resp.content)[-1] == "[DONE]"
        assert not any("error" in e for e in sse_events(resp.content) if isinstance(e, dict))
    else:
        assert resp.json()["choices"][0]["text"]
    assert len(d1.generation_records()) == 1
