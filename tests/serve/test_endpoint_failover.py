"""The circuit breaker and the drain on SIGTERM, over NIXL (neither depends on the connector).
Failover itself (retries, fallback) runs over every connector in tests/flow/test_failover.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, running, sse_events, start_proxy, wait_for

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
