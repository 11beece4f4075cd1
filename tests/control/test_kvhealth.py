"""KV-transfer health: parsing the engines' NIXL sums, the window, the judgement and its log
lines (tables), and a proxy that sees a simulated decoder pull slowly (real sockets)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from proxy.control.kvhealth import KvHealth, TransferTotals, TransferWindow, transfer_totals
from proxy.control.workers import Worker
from proxy.engines.connectors.nixl import NIXL_METRICS
from proxy.engines.promtext import parse
from tests.conftest import MODEL, Sim, running, start_proxy, wait_for

REAL = b"""# HELP vllm:nixl_xfer_time_seconds Histogram of transfer duration.
vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.005",model_name="m"} 3.0
vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 4.0
vllm:nixl_xfer_time_seconds_sum{engine="0",model_name="m"} 0.5
vllm:nixl_bytes_transferred_sum{engine="0",model_name="m"} 1.0e9
vllm:nixl_xfer_time_seconds_count{engine="1",model_name="m"} 1.0
vllm:nixl_xfer_time_seconds_sum{engine="1",model_name="m"} 0.25
vllm:nixl_bytes_transferred_sum{engine="1",model_name="m"} 5.0e8
vllm:nixl_post_time_seconds_sum{engine="0",model_name="m"} 0.01
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (REAL, TransferTotals(5.0, 0.75, 1.5e9)),  # summed over engines (DP ranks)
        (
            b"vllm:nixl_xfer_time_seconds_count 2\nvllm:nixl_xfer_time_seconds_sum 1\n",
            TransferTotals(2.0, 1.0, 0.0),
        ),
        (b"vllm:num_requests_running 1\n", None),  # no NIXL connector
        (b"vllm:nixl_xfer_time_seconds_count x\nvllm:nixl_xfer_time_seconds_sum 1\n", None),
        (b"", None),
    ],
)
def test_transfer_totals(text: bytes, expected: TransferTotals | None) -> None:
    names = (NIXL_METRICS.count, NIXL_METRICS.seconds, NIXL_METRICS.nbytes)
    assert transfer_totals(parse(text, names), NIXL_METRICS) == expected


def test_window_compares_the_oldest_sample_inside_with_the_newest() -> None:
    w = TransferWindow(10.0)
    assert w.rate() is None
    w.add(0.0, TransferTotals(0, 0.0, 0))
    w.add(5.0, TransferTotals(10, 1.0, 4e9))
    rate = w.rate()
    assert rate is not None
    assert (rate.transfers, rate.bandwidth, rate.seconds_per_transfer) == (10, 4e9, 0.1)
    w.add(20.0, TransferTotals(12, 1.5, 5e9))  # the base moves to t=5
    rate = w.rate()
    assert rate is not None and (rate.transfers, rate.nbytes, rate.window_s) == (2, 1e9, 15.0)
    w.add(25.0, TransferTotals(12, 1.5, 5e9))
    w.add(40.0, TransferTotals(12, 1.5, 5e9))
    assert w.rate() is None  # no transfer in the window
    w.add(41.0, TransferTotals(1, 0.1, 1e8))  # counters went back: the engine restarted
    assert w.rate() is None
    w.add(42.0, TransferTotals(3, 0.2, 3e8))
    rate = w.rate()
    assert rate is not None and rate.transfers == 2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slow_decoder_warned_with_the_fix_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = KvHealth(NIXL_METRICS, 2e9, window=30, min_bytes=1e8, warn_interval=60, clock=clock)
    w = Worker("decode", "d0", "http://d0:8000")
    caplog.set_level(logging.INFO, logger="pdproxy")

    def scrape(at: float, transfers: int, seconds: float, nbytes: float) -> None:
        clock.now = at
        health.observe(w, TransferTotals(transfers, seconds, nbytes))

    scrape(0, 0, 0.0, 0)
    scrape(5, 1, 0.01, 5e7)  # 5 GB/s but too few bytes to judge
    assert w.kv_transfer is not None and not w.kv_transfer.slow
    scrape(10, 4, 1.4, 5.5e8)  # 0.39 GB/s: slow
    assert w.kv_transfer is not None and w.kv_transfer.slow
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "http://d0:8000" in warnings[0] and "is slow: 0.39 GB/s" in warnings[0]
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" in warnings[0] and "TCP" in warnings[0]
    scrape(20, 5, 1.8, 6.9e8)  # still slow: no second warning within warn_interval
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    scrape(80, 6, 2.2, 8e8)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    scrape(120, 16, 2.3, 3.4e9)  # the window now holds only fast transfers (26 GB/s)
    assert w.kv_transfer is not None and not w.kv_transfer.slow
    assert "is fast again" in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.INFO  # good news is no warning
    health.observe(w, None)  # the engine stopped exposing the metrics
    assert w.kv_transfer is None


def pulls(health: KvHealth, worker: Worker, clock: Clock, rates: list[float]) -> None:
    """One scrape per pull of 100 MB at each of `rates` (GB/s), a second apart."""
    transfers, seconds, nbytes = 0, 0.0, 0.0
    health.observe(worker, TransferTotals(0, 0.0, 0.0))
    for gbps in rates:
        clock.now += 1
        transfers, seconds, nbytes = transfers + 1, seconds + 0.1 / gbps, nbytes + 1e8
        health.observe(worker, TransferTotals(transfers, seconds, nbytes))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("rates", "warned"),
    [
        ([1.4, 1.4] + [7.0] * 10, False),  # slow warm-up, then steady: the H200's start-up
        ([1.4] * 8 + [7.0] * 10, False),  # all of the warm-up slow
        ([7.0] * 8 + [1.4] * 3, False),  # too few pulls past warm-up to judge
        ([7.0] * 8 + [1.4] * 4, True),  # past warm-up and enough pulls: slow
        ([1.4] * 12, True),
    ],
)
def test_judged_after_warm_up_over_enough_pulls(
    caplog: pytest.LogCaptureFixture, rates: list[float], warned: bool
) -> None:
    clock = Clock()
    health = KvHealth(
        NIXL_METRICS,
        2e9,
        window=60,
        min_bytes=1e8,
        warn_interval=60,
        clock=clock,
        min_pulls=4,
        warmup_pulls=8,
    )
    w = Worker("decode", "d0", "http://d0:8000")
    caplog.set_level(logging.INFO, logger="pdproxy")
    pulls(health, w, clock, rates)
    assert bool(warnings_of(caplog)) == warned
    assert w.kv_transfer is not None and w.kv_transfer.slow == warned


def test_warm_up_counted_by_the_engine_not_by_the_proxy(caplog: pytest.LogCaptureFixture) -> None:
    """A proxy started beside engines long past their warm-up judges their pulls at once."""
    clock = Clock()
    health = KvHealth(NIXL_METRICS, 2e9, 60, 1e8, 60, clock, min_pulls=2, warmup_pulls=8)
    w = Worker("decode", "d0", "http://d0:8000")
    caplog.set_level(logging.INFO, logger="pdproxy")
    health.observe(w, TransferTotals(500, 10.0, 5e10))
    clock.now = 5
    health.observe(w, TransferTotals(502, 10.2, 5.02e10))  # 0.1 ms... 1 GB/s
    assert len(warnings_of(caplog)) == 1


@pytest.mark.parametrize(
    ("setting", "advised"),
    [
        (None, "set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y in the environment of every engine"),
        ("auto", "set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y in the environment of every engine"),
        ("y", "already run with UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y"),
    ],
)
def test_advice_knows_what_the_engines_have(
    caplog: pytest.LogCaptureFixture, setting: str | None, advised: str
) -> None:
    clock = Clock()
    health = KvHealth(NIXL_METRICS, 2e9, 60, 1e8, 60, clock, min_pulls=2, engine_get_zcopy=setting)
    w = Worker("decode", "d0", "http://d0:8000")
    caplog.set_level(logging.INFO, logger="pdproxy")
    pulls(health, w, clock, [0.5, 0.5])
    (warning,) = warnings_of(caplog)
    assert advised in warning
    if setting == "y":
        assert "set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" not in warning


def completion(words: int) -> dict[str, object]:
    prompt = " ".join(f"w{i}" for i in range(words))
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2}


def test_proxy_reports_a_slowly_pulling_decoder(tmp_path: Path, clean_sims: dict[str, Sim]) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    cfg = tmp_path / "kv.yaml"
    cfg.write_text(json.dumps({"kv_health": {
        "interval": 0.2, "window": 2.0, "min_bandwidth": 1e8, "min_bytes": 1e6,
        "min_pulls": 1, "warmup_pulls": 0,
    }}))  # fmt: skip
    d0.faults(kv_xfer_gbps=0.05)  # 50 MB/s, as a bad TCP path
    try:
        with running(start_proxy(tmp_path, [p0], [d0], "--config", str(cfg))) as proxy:
            for _ in range(3):
                r = httpx.post(proxy.url + "/v1/completions", json=completion(200), timeout=30)
                assert r.status_code == 200
            assert d0.metric("vllm:nixl_xfer_time_seconds_count") == 3

            def slow() -> bool:
                kv = proxy.stats()["kv_transfer"].get(d0.url)
                return bool(kv and kv["slow"])

            wait_for(slow)
            kv = proxy.stats()["kv_transfer"][d0.url]
            assert kv["bandwidth_bytes_per_second"] < 1e8 and kv["transfers"] >= 1
            worker = proxy.stats()["workers"]["decode"][0]
            assert worker["kv_transfer"]["slow"] is True
            m = proxy.metrics()
            assert 0 < m.total("pdproxy_kv_transfer_bandwidth_bytes_per_second", url=d0.url) < 1e8
            assert m.total("pdproxy_kv_transfer_slow", role="decode", url=d0.url) == 1
            assert m.total("pdproxy_kv_transfer_seconds", url=d0.url) > 0.05
            wait_for(lambda: "is slow" in proxy.log.read_text())
            line = next(x for x in proxy.log.read_text().splitlines() if "is slow" in x)
            assert d0.url in line and "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" in line

            d0.faults()  # the link is fixed; once the window holds only fast pulls, say so
            wait_for(lambda: not slow() and proxy.stats()["kv_transfer"] == {})
            for _ in range(3):
                r = httpx.post(proxy.url + "/v1/completions", json=completion(200), timeout=30)
                assert r.status_code == 200
            wait_for(lambda: "is fast again" in proxy.log.read_text())
            fast = next(x for x in proxy.log.read_text().splitlines() if "is fast again" in x)
            assert " INFO pdproxy: " in fast  # good news, not a warning
            assert proxy.metrics().total("pdproxy_kv_transfer_slow", url=d0.url) == 0
    finally:
        d0.faults()


def test_conditional_disaggregation_keeps_prompts_off_a_slow_kv_path(
    tmp_path: Path, clean_sims: dict[str, Sim]
) -> None:
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    cfg = tmp_path / "cd.yaml"
    cfg.write_text(json.dumps({
        "kv_health": {"interval": 0.2, "window": 30, "min_bandwidth": 1e8, "min_bytes": 1e6,
                      "min_pulls": 1, "warmup_pulls": 0},
        "conditional_disagg": {"enabled": True, "min_prefill_tokens": 16},
    }))  # fmt: skip
    d0.faults(kv_xfer_gbps=0.05)
    try:
        with running(start_proxy(tmp_path, [p0], [d0], "--config", str(cfg))) as proxy:
            url = proxy.url + "/v1/completions"
            assert httpx.post(url, json=completion(200), timeout=30).status_code == 200
            assert len(p0.generation_records()) == 1  # long: prefilled remotely, pulled slowly
            wait_for(lambda: proxy.stats()["kv_transfer"].get(d0.url, {}).get("slow"), 10)
            assert httpx.post(url, json=completion(201), timeout=30).status_code == 200
            assert len(p0.generation_records()) == 1  # now the decoder prefills it itself
            assert "kv_transfer_params" not in d0.generation_records()[-1]["body"]
            total = proxy.metrics().total
            assert total("pdproxy_disagg_decisions_total", decision="remote", reason="long") == 1
            assert total("pdproxy_disagg_decisions_total", decision="local", reason="slow_kv") == 1
    finally:
        d0.faults()


def test_proxy_quiet_through_a_slow_warm_up_and_told_the_engines_setting(
    tmp_path: Path, clean_sims: dict[str, Sim], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up seen on the H200: the first pulls of a fresh topology are slow, then steady.
    No warning for those; when the pulls are slow past the warm-up, the warning knows (from the
    environment the launcher gives the proxy) that the engines already have the UCX setting."""
    p0, d0 = clean_sims["p0"], clean_sims["d0"]
    cfg = tmp_path / "kv.yaml"
    # the engine's warm-up is its first pulls: the shared simulator has counted some already
    pulled = round(d0.metrics().total("vllm:nixl_xfer_time_seconds_count"))
    cfg.write_text(json.dumps({"kv_health": {
        "interval": 0.1, "window": 30, "min_bandwidth": 1e8, "min_bytes": 1e6,
        "min_pulls": 3, "warmup_pulls": pulled + 2,
    }}))  # fmt: skip
    monkeypatch.setenv("PDPROXY_ENGINE_UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    url_of = "/v1/completions"
    try:
        with running(start_proxy(tmp_path, [p0], [d0], "--config", str(cfg))) as proxy:
            d0.faults(kv_xfer_gbps=0.05)  # the two warm-up pulls: slow
            for _ in range(2):
                assert httpx.post(proxy.url + url_of, json=completion(200), timeout=30).is_success
            d0.faults()
            for _ in range(3):
                assert httpx.post(proxy.url + url_of, json=completion(200), timeout=30).is_success
            wait_for(lambda: proxy.stats()["kv_transfer"].get(d0.url, {}).get("transfers"), 10)
            judged = proxy.stats()["kv_transfer"][d0.url]
            assert judged["slow"] is False
            assert "is slow" not in proxy.log.read_text()

            d0.faults(kv_xfer_gbps=0.05)  # now slow for real
            for _ in range(3):
                assert httpx.post(proxy.url + url_of, json=completion(200), timeout=30).is_success
            wait_for(lambda: "is slow" in proxy.log.read_text())
            line = next(x for x in proxy.log.read_text().splitlines() if "is slow" in x)
            assert "already run with UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" in line
            assert "set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" not in line
    finally:
        d0.faults()
