"""The fault-injection suite, small: under kill -9, stalls, truncated and garbage answers and
bursts of 500s, every request ends in a full answer or a clear error; none is lost."""

from __future__ import annotations

from pathlib import Path

from benchmarks.faults import classify, run


def test_classify() -> None:
    assert classify(200, b'{"choices":[{"text":"hi"}]}', False)[0] == "succeeded"
    assert classify(502, b'{"error":{"message":"decoder died"}}', False)[0] == "clear_error"
    assert classify(502, b"Bad Gateway", False)[0] == "lost"
    ok = b'data: {"choices":[{"text":"a","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
    assert classify(200, ok, True)[0] == "succeeded"
    cut = b'data: {"choices":[{"text":"a"}]}\n\n'
    assert classify(200, cut, True)[0] == "lost"
    err = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"error":{"message":"x"}}\n\ndata: [DONE]\n\n'
    assert classify(200, err, True)[0] == "clear_error"


def test_no_request_is_lost(tmp_path: Path) -> None:
    tallies, memory = run(quick=True, logs=tmp_path)
    lost = {t.scenario: t.lost_examples for t in tallies if t.lost}
    assert not lost
    by_name = {t.scenario: t for t in tallies}
    assert by_name["baseline"].succeeded == by_name["baseline"].sent
    assert by_name["kill -9 prefiller"].retries >= 1
    assert by_name["bursts of 500s"].retries >= 1
    replaced = by_name["decoder replaced"].notes
    assert "DELETE d0: 202 d0 draining" in replaced and "201 d2 active" in replaced
    assert all(t.sent == t.succeeded + t.clear_errors for t in tallies)
    assert memory["rss_after_kib"] > 0
