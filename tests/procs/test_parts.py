"""The process model's parts, in one process: the `workers` setting, the channel's frames, the
snapshot and its mirror, the reports and their intake."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy.cli.main import main
from proxy.config import ConfigError, load_config
from proxy.config.sections import AdmissionConfig
from proxy.control.workers import Breaker, EngineLoad, Lifecycle, Worker, WorkerPool
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import LatencyStats, RequestTiming
from proxy.observe.timeline import TimelineRing
from proxy.observe.timeline import describe as timeline
from proxy.place.plan import Plan
from proxy.procs.channel import ChannelClosed, frame, read_message
from proxy.procs.loadtable import LoadTable
from proxy.procs.report import Intake, ReportingPool, Reports, timing_of
from proxy.procs.shared import Shared
from proxy.procs.snapshot import Mirror, SharedWorker, describe

TOPOLOGY: dict[str, Any] = {
    "prefill": ["http://127.0.0.1:7100"],
    "decode": ["http://127.0.0.1:7200"],
}


def test_workers_default_to_one_process_and_auto_leaves_a_core() -> None:
    assert load_config(**TOPOLOGY).serving_processes == 1
    assert load_config(**TOPOLOGY, workers=3).serving_processes == 3
    auto = load_config(**TOPOLOGY, workers="auto").serving_processes
    assert auto == max(1, len(os.sched_getaffinity(0)) - 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"workers": "many"}, "workers"),
    ],
)
def test_workers_that_cannot_be_served_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(**TOPOLOGY, **overrides)


def test_lmcache_and_kv_events_serve_with_several_processes() -> None:
    config = load_config(**TOPOLOGY, workers=2, connector="lmcache", kv_events={"enabled": True})
    assert config.serving_processes == 2


def test_the_flag_takes_a_number_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--workers", "two"])
    assert "not a number or auto: 'two'" in capsys.readouterr().err
    assert main(["serve", "--decode", "http://127.0.0.1:1", "--workers", "0"]) == 2


def test_frames_round_trip_and_a_broken_peer_is_a_closed_channel() -> None:
    async def read(data: bytes) -> dict[str, Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader)

    assert asyncio.run(read(frame({"t": "hello", "name": "w1"}))) == {"t": "hello", "name": "w1"}
    for broken in (frame({"t": "x"})[:-1], b"\x00\x00\x00\x02[]", b"\xff\xff\xff\xff"):
        with pytest.raises(ChannelClosed):
            asyncio.run(read(broken))


def control_pools() -> tuple[WorkerPool, WorkerPool, WorkerPool]:
    prefill = WorkerPool.from_urls("prefill", ["http://p0"])
    decode = WorkerPool.from_urls("decode", ["http://d0", "http://d1"])
    return prefill, decode, WorkerPool("pool")


@pytest.fixture
def shared() -> Iterator[Shared]:
    """The control process's shared tables, for two serving processes."""
    tables = Shared(2, AdmissionConfig(max_concurrent=2))
    try:
        yield tables
    finally:
        tables.close()


@pytest.fixture
def attach(shared: Shared) -> Iterator[Callable[[int], LoadTable]]:
    """The load table as serving process `column` attaches to it."""
    attached: list[LoadTable] = []

    def column(index: int) -> LoadTable:
        attached.append(LoadTable.attach(shared.load.name, index))
        return attached[-1]

    yield column
    for table in attached:
        table.close()


def snapshot(control: tuple[WorkerPool, ...], shared: Shared) -> list[dict[str, Any]]:
    return describe(control, shared.assign(control))


def test_the_mirror_follows_drains_and_removals_and_counts_on_the_shared_table(
    shared: Shared, attach: Callable[[int], LoadTable]
) -> None:
    control = control_pools()
    local = tuple(ReportingPool(p.role) for p in control)
    ended: list[str] = []
    forgotten: list[str] = []
    draining: list[str] = []
    mirror = Mirror(
        local,
        attach(0),
        lambda w: forgotten.append(w.id),
        lambda w: ended.append(w.id),
        lambda w: draining.append(w.id),
    )
    mirror.apply(snapshot(control, shared), True)
    d1 = local[1].workers[1]
    assert isinstance(d1, SharedWorker)
    other = attach(1)  # the other serving process's column
    other.add(shared.slots[control[1].members[1]][0], 1, 7)
    with local[1].track(d1, 10):
        assert (d1.inflight, d1.inflight_chars, d1.own) == (2, 17, 1)  # both processes' requests
        shared.show()
        assert control[1].members[1].inflight == 2  # the control process reads the sums too
        control[1].members[1].engine_load = EngineLoad(3, 1, 0.5, 0)
        control[1].drain(control[1].members[1])
        mirror.apply(snapshot(control, shared), True)
        assert [w.id for w in local[1].workers] == ["d0"] and local[1].members[1] is d1
        assert d1.state is Lifecycle.DRAINING and d1.inflight == 2  # its row stays
        assert d1.engine_load == EngineLoad(3, 1, 0.5, 2)  # measured from the table's sum now
        mirror.apply(snapshot(control, shared), True)
        assert draining == ["d1"]  # its drain's clock started once, here
        control[1].remove(control[1].members[1])
        mirror.apply(snapshot(control, shared), True)
        assert [w.id for w in local[1].members] == ["d0"] and d1.state is Lifecycle.REMOVED
        assert ended == ["d1"] and forgotten == ["d1"]  # its requests here end with an error
    assert d1.own == 0


def test_the_control_process_gives_slots_reads_the_sums_and_resets_a_dead_process(
    shared: Shared, attach: Callable[[int], LoadTable]
) -> None:
    control = control_pools()
    slots = shared.assign(control)
    d0, d1 = control[1].members
    assert len({slot for slot, _ in slots.values()}) == 3  # one slot per engine
    mine, other = attach(0), attach(1)
    mine.add(slots[d0][0], 1, 5)
    other.add(slots[d0][0], 2, 5)
    shared.show()
    assert (d0.inflight, d0.inflight_chars, d1.inflight) == (3, 10, 0)
    shared.reset("w2")  # it died: its column goes, before its replacement starts
    shared.show()
    assert (d0.inflight, d0.inflight_chars) == (1, 5)
    control[1].remove(d1)
    slot = slots[d1]
    assert d1 not in shared.assign(control)  # a removed worker gives its slot back
    control[1].add(Worker("decode", "d2", "http://d2"))
    shared.assign(control)
    assert shared.slots[control[1].members[-1]] != slot  # a joining worker gets one


def test_a_failure_seen_here_holds_until_the_control_process_has_it(
    shared: Shared, attach: Callable[[int], LoadTable]
) -> None:
    control = control_pools()
    reports = Reports()
    local = tuple(ReportingPool(p.role, (), 1, 10.0, reports=reports) for p in control)
    mirror = Mirror(local, attach(0), lambda w: None, lambda w: None)
    mirror.apply(snapshot(control, shared), True)
    d0 = local[1].workers[0]
    local[1].record_failure(d0, "boom")  # threshold 1: open here at once
    assert d0.breaker is Breaker.OPEN
    mirror.apply(snapshot(control, shared), reports.breakers_settled(0))  # taken before it heard
    assert d0.breaker is Breaker.OPEN
    metrics = ProxyMetrics(local)
    report = reports.take(metrics, local)
    assert report is not None and report["outcomes"] == [("d0", "failed", "boom")]
    assert not reports.breakers_settled(0) and reports.breakers_settled(report["seq"])
    local[1].record_success(d0)  # a success the control process has not heard of holds nothing
    assert reports.breakers_settled(report["seq"])


def test_the_intake_counts_every_process_once() -> None:
    control = control_pools()
    metrics = ProxyMetrics(control)
    stats = LatencyStats(100, CollectorRegistry())
    timelines = TimelineRing()
    intake = Intake(control, stats, timelines, metrics)
    for name in ("w1", "w2"):
        reports = Reports()
        local = tuple(ReportingPool(p.role, (), reports=reports) for p in control)
        mine = ProxyMetrics(local)
        mine.requests.labels("/v1/completions", "200").inc()
        reports.timing(RequestTiming(start=1.0, end=2.0, request_id=f"pdp-{name}-1", status=200))
        d0 = Worker("decode", "d0", "http://d0")
        local[1].members = local[1].workers = (d0,)
        local[1].record_success(local[1].members[0])
        report = reports.take(mine, local)
        assert report is not None
        intake.take(name, report)
        assert reports.take(mine, local) is None  # nothing new
    assert stats.recorded == 2 and len(timelines) == 2
    assert metrics.requests.labels("/v1/completions", "200")._value.get() == 2


def test_a_private_directory_too_deep_for_a_socket_is_one_line_and_exit_2(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--prefill", "http://127.0.0.1:1",
         "--decode", "http://127.0.0.1:2", "--port", "0", "--workers", "2"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(deep)},
    )  # fmt: skip
    assert run.returncode == 2
    assert "set TMPDIR to a short path" in run.stderr
    assert list(deep.iterdir()) == []  # its directory went with it


def test_a_reported_timing_is_the_timing_it_was() -> None:
    """A row carries every field of RequestTiming, in order, and the plan as it describes
    itself: the control process's timeline of a request is the serving process's."""
    d0, p0 = Worker("decode", "d0", "http://d0"), Worker("prefill", "p0", "http://p0")
    timing = RequestTiming(
        start=1.0, admitted=1.5, prefill_start=2.0, prefill_end=3.0, first_token=4.0,
        last_token=5.0, token_events=7, output_tokens=9, end=6.0, path="/v1/completions",
        request_id="pdp-w1-abc", stream=True, status=200, prefiller="p0", decoder="d0",
        kv="handed_over", retries=1, plan=Plan(d0, "remote", "policy", p0, 12), error=None,
    )  # fmt: skip
    timing.seams.append({"from": "d1", "to": "d0", "reason": "boom", "tokens_moved": 3})
    reports = Reports()
    reports.timing(timing)
    row = orjson.loads(orjson.dumps(reports.timings))[0]  # as the channel carries it
    back = timing_of(row)
    assert back.plan is not None and timing.plan is not None
    assert back.plan.describe() == timing.plan.describe()
    back.plan = timing.plan
    assert back == timing
    assert timeline(back, 1, now=10.0) == timeline(timing, 1, now=10.0)


def test_successes_travel_once_per_worker_until_something_else_happens() -> None:
    reports = Reports()
    pool = ReportingPool("decode", (), 3, 10.0, reports=reports)
    d0, d1 = Worker("decode", "d0", "http://d0"), Worker("decode", "d1", "http://d1")
    for worker in (d0, d1, d0, d1, d0):
        pool.record_success(worker)
    pool.record_failure(d0, "boom")
    pool.record_success(d0)
    pool.record_success(d0)
    pool.record_success(d1)
    assert reports.outcomes == [
        ("d0", "ok", None), ("d1", "ok", None), ("d0", "failed", "boom"), ("d0", "ok", None)
    ]  # fmt: skip
    report = reports.take(ProxyMetrics((pool,)), (pool,))
    assert report is not None
    pool.record_success(d0)  # a new report: the first success of each worker again
    assert reports.outcomes == [("d0", "ok", None)]
    # the control process's breakers end where the serving process's did
    control = WorkerPool("decode", (Worker("decode", "d0", "http://d0"),), 3, 10.0)
    intake = Intake((control,), LatencyStats(10, CollectorRegistry()), TimelineRing(),
                    ProxyMetrics((control,)))  # fmt: skip
    control.members[0].consecutive_failures = 2
    intake.take("w1", report)
    assert control.members[0].consecutive_failures == 0
    assert control.members[0].failures_total == 1
