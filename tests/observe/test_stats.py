import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proxy.observe.stats import Buckets, LatencyStats, RequestTiming, RollingWindow, Summary


def test_window_is_bounded_and_keeps_the_latest() -> None:
    window = RollingWindow(4)
    for v in range(10):
        window.add(float(v))
    assert len(window) == 4
    assert sorted(window.values().tolist()) == [6.0, 7.0, 8.0, 9.0]
    assert window.values().nbytes == 4 * 8  # memory fixed at creation


def test_summary_maths() -> None:
    values = np.arange(1, 101, dtype=np.float64)  # 1..100
    s = Summary.of(values)
    assert s is not None
    assert (s.count, s.mean, s.p50) == (100, 50.5, 50.5)
    assert s.p95 == pytest.approx(95.05) and s.p99 == pytest.approx(99.01)
    assert Summary.of(np.array([])) is None


def test_record_derives_each_quantity() -> None:
    registry = CollectorRegistry()
    stats = LatencyStats(100, registry)
    t = RequestTiming(start=10.0, prefill_start=10.001, prefill_end=10.101)
    t.first_token, t.last_token, t.token_events, t.end = 10.2, 10.5, 4, 10.6
    t.output_tokens = 7  # some chunks carried two tokens
    stats.record(t)
    got = {k: (None if s is None else round(s.mean, 6)) for k, s in stats.summaries().items()}
    assert got == {
        "prefill": 0.1,
        "decode_first_token": 0.099,
        "ttft": 0.2,
        "itl": 0.1,
        "tpot": 0.05,
        "e2e": 0.6,
    }
    text = generate_latest(registry).decode()
    assert "pdproxy_ttft_seconds_count 1.0" in text
    assert 'pdproxy_itl_seconds_bucket{le="0.16"} 1.0' in text


def test_partial_requests_record_what_they_reached() -> None:
    stats = LatencyStats(10, CollectorRegistry())
    stats.record(RequestTiming(start=0.0, end=0.5))  # rejected before prefill
    s = stats.summaries()
    assert s["e2e"] is not None and s["e2e"].count == 1
    assert s["ttft"] is None and s["prefill"] is None


def test_report_in_milliseconds(caplog: pytest.LogCaptureFixture) -> None:
    stats = LatencyStats(10, CollectorRegistry())
    stats.record(RequestTiming(start=0.0, first_token=0.25, end=1.0))
    report = stats.report()
    assert "ttft" in report and "250.00" in report and "1000.00" in report
    assert report.splitlines()[1].split() == ["count", "mean", "p50", "p95", "p99"]
    assert logging.getLogger("pdproxy") is not None


def test_the_histograms_expose_what_prometheus_clients_would() -> None:
    """Buckets (bisect, no locks) against prometheus_client's Histogram with the same bounds:
    the same exposition, bucket edges included (le: the value at most the bound)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (0.001, 0.0025, 0.01, 1.0, 120.0)
    mine = Buckets("pdproxy_x_seconds", "what x is", bounds, ours)
    reference = Histogram("pdproxy_x_seconds", "what x is", buckets=bounds, registry=theirs)
    for value in (0.0, 0.001, 0.0010001, 0.0025, 0.003, 1.0, 119.0, 120.0, 121.0, 5e3):
        mine.observe(value)
        reference.observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [
            line for line in text.splitlines() if not line.startswith("pdproxy_x_seconds_created")
        ]

    assert lines(ours) == lines(theirs)
    assert 'pdproxy_x_seconds_bucket{le="0.001"} 2.0' in lines(ours)
    assert "pdproxy_x_seconds_created " in generate_latest(ours).decode()
    assert mine.count == 10
