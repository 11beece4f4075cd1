"""The ring of recent request timelines: bounded, and each entry's hops."""

from __future__ import annotations

from proxy.observe.stats import RequestTiming
from proxy.observe.timeline import TimelineRing, describe


def timing(i: int) -> RequestTiming:
    t = RequestTiming(start=100.0, admitted=100.001, prefill_start=100.002, prefill_end=100.052)
    t.first_token, t.last_token, t.end = 100.062, 100.262, 100.263
    t.request_id, t.path, t.status, t.prefiller, t.decoder = (
        f"r{i}",
        "/v1/completions",
        200,
        "p0",
        "d1",
    )
    t.kv, t.output_tokens, t.token_events = "handed_over", 11, 6
    return t


def test_ring_is_bounded_and_keeps_the_newest() -> None:
    ring = TimelineRing(3)
    for i in range(10):
        ring.add(timing(i))
    assert len(ring) == 3 and ring.seq == 10
    assert [t["request_id"] for t in ring.since(0)] == ["r7", "r8", "r9"]
    assert [t["seq"] for t in ring.since(8)] == [9, 10]
    assert ring.since(10) == [] and [t["seq"] for t in ring.since(0, limit=1)] == [10]
    found = ring.find("r8")
    assert found is not None and found["seq"] == 9 and ring.find("r1") is None


def test_hops_of_a_disaggregated_request() -> None:
    d = describe(timing(0), 1, now=100.263)
    assert d["ms"] == {
        "admission": 1.0,
        "prefill": 50.0,
        "handoff": 10.0,
        "decode": 200.0,
        "ttft": 62.0,
        "itl": 40.0,
        "tpot": 20.0,
        "total": 263.0,
    }
    assert (d["prefiller"], d["decoder"], d["kv"]) == ("p0", "d1", "handed_over")
    assert d["at_ms"]["first_token"] == 62.0


def test_a_request_that_never_reached_an_engine_has_only_what_it_reached() -> None:
    t = RequestTiming(start=5.0, end=5.002)
    t.status, t.error = 429, "the proxy is at its limit"
    d = describe(t, 1, now=5.002)
    assert d["ms"]["total"] == 2.0 and d["ms"]["prefill"] is None and d["ms"]["handoff"] is None
    assert d["error"] == "the proxy is at its limit" and d["prefiller"] is None


def test_a_migrated_stream_shows_its_seams() -> None:
    """The continuation's timing joins the stream's: where it moved, how many tokens moved,
    the client's gap between the last token before and the first after."""
    t = timing(0)  # its decoder d1 failed after 4 tokens, its last one at 100.262
    after = RequestTiming(start=100.3, first_token=100.3125, last_token=100.4)
    after.decoder, after.kv, after.output_tokens, after.token_events = "d0", "handed_over", 7, 7
    t.seam("d1", "connection", 4, after)
    d = describe(t, 1, now=100.5)
    assert d["seams"] == [{"from": "d1", "to": "d0", "reason": "connection", "tokens_moved": 4,
                           "gap_ms": 50.5, "kv": "handed_over"}]  # fmt: skip
    assert (d["decoder"], d["output_tokens"], d["at_ms"]["last_token"]) == ("d0", 11, 400.0)
