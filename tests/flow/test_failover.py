"""Failover on the request path over every connector (2 prefillers, 2 decoders): a prefill
retried on another prefiller, a decode retried on another decoder before any byte reached the
client, a decoder-local prefill when no prefiller is left, and a stream broken after its first
byte continued, not restarted (tests/flow/test_migrate.py holds the rest of migration)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import MODEL, sse_events, wait_for
from tests.flow.rig import RECOMPUTED, Body, Engines, Topology, post, start_topology, unique

FAILOVER = (
    "health: {interval: 0.2, timeout: 1, failure_threshold: 2, cooldown: 1}\n"
    "timeouts: {prefill: 2, decode_first_byte: 2, decode_idle: 2}\n"
)


@pytest.fixture(scope="module")
def _failover(engines: Engines, serving_procs: int) -> Iterator[Topology]:
    """2p2d, quick health checks, breaker after 2 failures with a 1 s cool-down."""
    topo = start_topology(
        engines, "failover", prefillers=2, decoders=2, config=FAILOVER, workers=serving_procs
    )
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture
def fresh(_failover: Topology) -> Topology:
    _failover.reset()
    workers = lambda: _failover.proxy.stats()["workers"]  # noqa: E731
    wait_for(lambda: all(w["available"] for r in ("prefill", "decode") for w in workers()[r]))
    # and idle: least_loaded gives the first decoder each test's request (the one given a
    # fault) only if the last test's legs have all ended there
    wait_for(lambda: all(w["inflight"] == 0 for r in ("prefill", "decode") for w in workers()[r]))
    return _failover


@pytest.fixture
def body() -> Body:
    """A prompt no decoder has seen (an LMCache decoder keeps what was pushed to it), and an
    answer of `max_tokens` always: the simulator ends one at its end-of-sequence token with
    probability 0.005 a token, seeded by the prompt, and a new prompt each run made about one run
    in a hundred end early (no text to check; a stream over before its decoder's fault)."""
    return {"model": MODEL, "prompt": unique("fail me over"), "max_tokens": 4, "ignore_eos": True}


@pytest.mark.workers2
def test_prefill_failure_is_retried_on_another_prefiller(fresh: Topology, body: Body) -> None:
    p0, p1 = fresh.prefill
    p0.faults(error_status=503, count=1)
    before = fresh.proxy.metrics().total("pdproxy_retries_total", role="prefill")
    resp = post(fresh, body)
    assert resp.status_code == 200
    assert len(p0.generation_records()) == 1 and len(p1.generation_records()) == 1
    # (a serving process's counters reach /metrics with its next report: waited for)
    wait_for(
        lambda: fresh.proxy.metrics().total("pdproxy_retries_total", role="prefill") == before + 1
    )
    assert sum(fresh.kv_in(d) for d in fresh.decode) == 1  # the KV from p1 reached the decoder
    assert sum(d.metric(RECOMPUTED) for d in fresh.decode) == 0


def test_no_prefiller_left_falls_back_to_decoder_prefill(fresh: Topology, body: Body) -> None:
    for p in fresh.prefill:
        p.faults(error_status=500, count=1)
    metrics = fresh.proxy.metrics
    before = metrics().total("pdproxy_prefill_fallbacks_total", reason="prefill_failed")
    resp = post(fresh, body)
    assert resp.status_code == 200
    after = metrics().total("pdproxy_prefill_fallbacks_total", reason="prefill_failed")
    assert after == before + 1
    [decode] = [r for d in fresh.decode for r in d.generation_records()]
    assert "kv_transfer_params" not in decode["body"] and decode["kv"] == fresh.wire.local_kv


@pytest.mark.workers2
def test_client_errors_are_never_retried(fresh: Topology, body: Body) -> None:
    p0, p1 = fresh.prefill
    p0.faults(error_status=400, error_message="bad temperature", count=1)
    resp = post(fresh, body)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "bad temperature"
    assert p1.generation_records() == []
    assert all(d.generation_records() == [] for d in fresh.decode)


@pytest.mark.workers2
def test_decode_failure_before_first_byte_moves_to_another_decoder(
    fresh: Topology, body: Body
) -> None:
    """The second decoder gets the same body. Over NIXL it pulls the same KV from the
    prefiller; over LMCache the KV was pushed to the first decoder, so the second computes the
    prompt itself, counted as a recompute."""
    d0, d1 = fresh.decode
    d0.faults(error_status=500, count=1)
    before = fresh.proxy.metrics().total("pdproxy_kv_recompute_total", reason="decoder_retry")
    resp = post(fresh, {**body, "stream": True})
    assert resp.status_code == 200 and sse_events(resp.content)[-1] == "[DONE]"
    [first] = d0.generation_records()
    [second] = d1.generation_records()
    assert first["body"] == second["body"]
    assert first["body"].get("kv_transfer_params") == second["body"].get("kv_transfer_params")
    assert second["kv"] == fresh.wire.retried_decoder_kv
    handed_over = fresh.wire.retried_decoder_kv == "pulled"
    assert fresh.kv_in(d1) == (1 if handed_over else 0)
    assert d1.metric(RECOMPUTED) == (0 if handed_over else 1)
    wait_for(lambda: fresh.proxy.metrics().total("pdproxy_retries_total", role="decode") >= 1)
    # a recompute is never silent: counted and logged where the KV could not follow
    moved = 0 if handed_over else 1
    recomputes = fresh.proxy.metrics
    wait_for(
        lambda: (
            recomputes().total("pdproxy_kv_recompute_total", reason="decoder_retry") - before
            == moved
        )
    )


@pytest.mark.workers2
def test_nothing_is_restarted_once_bytes_reached_the_client(fresh: Topology, body: Body) -> None:
    """The stream goes on from where it broke (proxy.flow.migrate): the other decoder is asked
    for the rest only, its prompt the first prompt's ids and the ids generated so far."""
    d0, d1 = fresh.decode
    d0.faults(drop_after_chunks=2, count=1)
    resp = post(fresh, {**body, "max_tokens": 20, "stream": True})
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    (rest,) = d1.generation_records()
    moved = 20 - rest["body"]["max_tokens"]
    assert 2 <= moved < 20 and all(isinstance(t, int) for t in rest["body"]["prompt"])


def test_unhealthy_worker_gets_no_traffic(fresh: Topology, body: Body) -> None:
    d0, d1 = fresh.decode
    d0.faults(unhealthy=True)
    wait_for(lambda: not fresh.proxy.stats()["workers"]["decode"][0]["available"])
    for _ in range(4):
        assert post(fresh, body).status_code == 200
    assert d0.generation_records() == [] and len(d1.generation_records()) == 4
    d0.reset()
    wait_for(lambda: fresh.proxy.stats()["workers"]["decode"][0]["available"])


def test_idle_decoder_mid_stream_is_left_for_another(fresh: Topology, body: Body) -> None:
    """Silent past decode_idle (2 s): the stream goes on on the other decoder at once."""
    d0, _ = fresh.decode
    d0.faults(stall_seconds=4, stall_after_chunks=2, count=1)
    before = fresh.proxy.metrics().total("pdproxy_migrations_total", reason="timeout")
    t0 = time.monotonic()
    resp = post(fresh, {**body, "max_tokens": 20, "stream": True})
    events = sse_events(resp.content)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert time.monotonic() - t0 < 3.5
    after = fresh.proxy.metrics().total("pdproxy_migrations_total", reason="timeout")
    assert after == before + 1


@pytest.mark.workers2
@pytest.mark.parametrize("stream", [True, False])
def test_garbage_from_a_decoder_is_caught_and_failed_over(
    fresh: Topology, body: Body, stream: bool
) -> None:
    d0, d1 = fresh.decode
    d0.faults(garbage_body=True, count=1)
    resp = httpx.post(fresh.url + "/v1/completions", json={**body, "stream": stream}, timeout=30)
    assert resp.status_code == 200
    if stream:
        assert sse_events(resp.content)[-1] == "[DONE]"
        assert not any("error" in e for e in sse_events(resp.content) if isinstance(e, dict))
    else:
        assert resp.json()["choices"][0]["text"]
    assert len(d1.generation_records()) == 1
