"""What a serving process reports to the control process, and how the control process takes it in.

A serving process serves with the data plane as it is; two hooks, set only in a serving process,
note what it did for the next report and the shared load table (so the request path of one
process pays nothing for them):

    Reports.timing  the data plane's `Services.reporter`: every finished request's RequestTiming
                    (the timeline, and through it the latency windows and histograms of the one
                    /stats and /metrics), instead of its own stats and timelines, which nothing
                    would read (a serving process forwards /stats, /metrics and the admin API)
    ReportingPool   its WorkerPools: every breaker outcome (success, failure with its reason,
                    a trip by its stall watch); every tracked request, on the load table

and each report adds the prompt tokens its pool placement placed (for the pool's controller), what
its metrics' counters gained since the last one (all of ProxyMetrics' counters: requests, retries,
migrations, the planner's decisions, ...; and the connector's, `extra`: LMCache's notifications
and timeouts), and its gauges that the control process sums (`gauges`: LMCache's waiting
requests).
A report goes every `every` seconds (proxy.procs.link) when there is something to say.

The pool counts each request on the shared load table as it is tracked (`ReportingPool.track`,
through the worker's row: proxy.procs.snapshot.SharedWorker), so that every process's policies
see it at once, and so are the pool's prefill tokens and decode streams; the reports carry no
load, nor admission numbers (the admission is shared: proxy.procs.admission).

A timing travels as a row: its fields' values in RequestTiming's order, the plan described (the
control process makes the timing back from one in 0.4 µs, against 2.3 µs from a dict of its 20
names; timeit on the 2-core box).
Successes travel once per worker until something else happens to it: a breaker's success only
closes it and zeroes its failures, so a run of them is one.

The control process (`Intake`) replays the timings into its stats and timelines, the outcomes into
its breakers (so the breakers it publishes count every process's failures), the counter gains into
its own counters, so /metrics, /stats and the console see every process. Requests in flight,
prompt characters, prefill tokens, decode streams and admission numbers it reads from the shared
tables (proxy.procs.shared).
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from proxy.control.workers import Lease, Worker, WorkerPool
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import LatencyStats, RequestTiming
from proxy.observe.timeline import TimelineRing
from proxy.procs.snapshot import SharedWorker
from proxy.serve.plane import Prompts

TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(RequestTiming))  # a row's order
_PLAN = TIMING_FIELDS.index("plan")
_row_of = operator.attrgetter(*TIMING_FIELDS)
CounterKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Reports:
    """A serving process's report in the making."""

    timings: list[list[Any]] = field(default_factory=list)  # rows (TIMING_FIELDS)
    # (worker id, "ok" | "failed" | "stalled", reason)
    outcomes: list[tuple[str, str, str | None]] = field(default_factory=list)
    last_outcome: dict[str, str] = field(default_factory=dict)  # worker id -> in this report
    seq: int = 0  # reports sent
    failures_seq: int = 0  # the last report that carried a failure (or a stall's trip)
    counted: dict[CounterKey, float] = field(default_factory=dict)  # counters, as last sent
    routing_changed_at: float = 0.0  # as last sent (proxy.procs.snapshot.Mirror.changed_at)
    prompts: list[int] = field(default_factory=lambda: [0, 0])  # placed prompt tokens: long, local
    # new prefix placements, for the other processes' indexes (proxy.procs.prefixes)
    prefixes: list[tuple[list[int], str]] = field(default_factory=list)
    prefixes_dropped: int = 0  # left out of the reports: more than a report's limit
    prefixes_learned: int = 0  # the other processes' placements taken in (relayed to it)
    learned_sent: int = 0  # prefixes_learned as last sent
    # counters outside ProxyMetrics whose gains are reported too (the connector's), by name
    extra: dict[str, Counter] = field(default_factory=dict)
    # values the control process sums over the processes (proxy.procs.report.Intake.gauge)
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict)
    gauged: dict[str, float] = field(default_factory=dict)  # as last sent

    def prompt(self, computed: int, long: bool) -> None:
        """A request was placed (a pool's planner): for the pool's controller (proxy.serve.plane
        .Prompts), which runs in the control process."""
        self.prompts[0 if long else 1] += computed

    def timing(self, t: RequestTiming) -> None:
        row = list(_row_of(t))
        if t.plan is not None:
            row[_PLAN] = t.plan.describe()
        self.timings.append(row)

    def outcome(self, worker_id: str, kind: str, reason: str | None = None) -> None:
        """A breaker outcome, for the control process's breakers; a success right after a
        success of the same worker changes nothing there, and is left out."""
        if kind == "ok" and self.last_outcome.get(worker_id) == "ok":
            return
        self.last_outcome[worker_id] = kind
        self.outcomes.append((worker_id, kind, reason))

    def breakers_settled(self, ack: int) -> bool:
        """Whether the control process, having applied reports up to `ack`, knows every failure
        this process saw (then its published breakers may replace this process's). Successes do
        not hold it back: under load nearly every report carries some, and a success the control
        process has not heard of yet only closes a breaker a moment later."""
        return not self._failures(self.outcomes) and ack >= self.failures_seq

    @staticmethod
    def _failures(outcomes: list[tuple[str, str, str | None]]) -> bool:
        return any(kind != "ok" for _, kind, _ in outcomes)

    def take(
        self,
        metrics: ProxyMetrics,
        pools: Iterable[WorkerPool],
        routing_changed_at: float = 0.0,
    ) -> dict[str, Any] | None:
        """The next report, or None when nothing changed since the last."""
        counters = self._counter_gains(metrics)
        gauged = {name: read() for name, read in self.gauges.items()}
        news = bool(self.timings or self.outcomes or counters or any(self.prompts) or self.prefixes)
        news = news or gauged != self.gauged or self.prefixes_learned != self.learned_sent
        if not news and routing_changed_at == self.routing_changed_at:
            return None
        self.routing_changed_at = routing_changed_at
        self.seq += 1
        if self._failures(self.outcomes):
            self.failures_seq = self.seq
        report = {
            "t": "report",
            "seq": self.seq,
            "timings": self.timings,
            "outcomes": self.outcomes,
            "counters": counters,
            "routing_changed_at": routing_changed_at,
            "prompts": self.prompts,
            "gauges": gauged,
            "prefixes_learned": self.prefixes_learned,
        }
        self.learned_sent = self.prefixes_learned
        if self.prefixes:
            report["prefixes"] = self.prefixes
            report["prefixes_dropped"] = self.prefixes_dropped  # since the process started
            self.prefixes = []
        self.timings, self.outcomes, self.prompts = [], [], [0, 0]
        self.last_outcome = {}
        self.gauged = gauged
        return report

    def _counter_gains(self, metrics: ProxyMetrics) -> list[tuple[str, dict[str, str], float]]:
        gains = []
        for key, value in counter_values(metrics, self.extra).items():
            gain = value - self.counted.get(key, 0.0)
            if gain:
                self.counted[key] = value
                gains.append((key[0], dict(key[1]), gain))
        return gains


def counter_values(
    metrics: ProxyMetrics, extra: Mapping[str, Counter] | None = None
) -> dict[CounterKey, float]:
    """Every counter sample of `metrics` and of `extra`, keyed by its attribute (or name in
    `extra`) and labels."""
    values: dict[CounterKey, float] = {}
    for attr, counter in {**vars(metrics), **(extra or {})}.items():
        if not isinstance(counter, Counter):
            continue
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[(attr, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@dataclass(eq=False)
class ReportingPool(WorkerPool):
    """A serving process's pool: each breaker outcome is also noted for the next report."""

    reports: Reports = field(default_factory=Reports)

    @contextmanager
    def track(
        self,
        worker: Worker,
        chars: int,
        prefill_tokens: int = 0,
        owner: asyncio.Task[Any] | None = None,
    ) -> Iterator[Lease]:
        """WorkerPool.track, with the request counted in this process's column of the load table
        (the worker's row) and in the worker's `own` while inside."""
        assert isinstance(worker, SharedWorker)  # a serving process's workers are the mirror's
        row = worker.row
        row.add(1, chars)
        worker.own += 1
        try:
            with super().track(worker, chars, prefill_tokens, owner) as lease:
                yield lease
        finally:
            worker.own -= 1
            row.sub(1, chars)

    def record_success(self, worker: Worker) -> None:
        super().record_success(worker)
        self.reports.outcome(worker.id, "ok")

    def record_failure(self, worker: Worker, reason: str, now: float | None = None) -> None:
        super().record_failure(worker, reason, now)
        self.reports.outcome(worker.id, "failed", reason)

    def trip(self, worker: Worker, reason: str, now: float | None = None) -> None:
        super().trip(worker, reason, now)
        self.reports.outcome(worker.id, "stalled", reason)


class PlanView:
    """A reported timing's plan, as its timeline shows it."""

    __slots__ = ("_described",)

    def __init__(self, described: dict[str, Any]) -> None:
        self._described = described

    def describe(self) -> dict[str, Any]:
        return self._described


def timing_of(row: list[Any]) -> RequestTiming:
    """A reported row (Reports.timing) as the RequestTiming it was."""
    timing = RequestTiming(*row)
    if timing.plan is not None:
        timing.plan = PlanView(timing.plan)  # type: ignore[arg-type]  # its description
    return timing


class Intake:
    """The control process's side: every serving process's reports, taken into the one set of
    stats, timelines, breakers and counters."""

    def __init__(
        self,
        pools: Iterable[WorkerPool],
        stats: LatencyStats,
        timelines: TimelineRing,
        metrics: ProxyMetrics,
        prompts: Prompts | None = None,
    ) -> None:
        self.pools = tuple(pools)
        self.prompts = prompts  # the pool's controller, where there is one
        self.stats = stats
        self.timelines = timelines
        self.metrics = metrics
        self.gauges: dict[str, dict[str, float]] = {}  # process -> name -> its last value
        self.extra: dict[str, Counter] = {}  # the counters of Reports.extra, by the same names
        self.reported: dict[str, int] = {}  # process -> requests it reported

    def take(self, process: str, report: dict[str, Any]) -> None:
        workers = {w.id: (p, w) for p in self.pools for w in p.members}
        for item in report.get("timings", ()):
            timing = timing_of(item)
            self.stats.record(timing)
            self.timelines.add(timing)
            self.reported[process] = self.reported.get(process, 0) + 1
        for worker_id, outcome, reason in report.get("outcomes", ()):
            found = workers.get(worker_id)
            if found is not None:
                pool, worker = found
                if outcome == "ok":
                    pool.record_success(worker)
                elif outcome == "stalled":
                    pool.trip(worker, reason or outcome)
                else:
                    pool.record_failure(worker, reason or outcome)
        for attr, labels, gain in report.get("counters", ()):
            self._count(attr, labels, gain)
        long, local = report.get("prompts", (0, 0))
        if self.prompts is not None:
            for computed, is_long in ((long, True), (local, False)):
                if computed:
                    self.prompts.prompt(computed, is_long)
        self.gauges[process] = report.get("gauges", {})

    def gauge(self, name: str) -> float:
        """The sum over the processes of one of their reported gauges."""
        return sum(gauges.get(name, 0.0) for gauges in self.gauges.values())

    def _count(self, attr: str, labels: dict[str, str], gain: float) -> None:
        counter = self.extra.get(attr) or getattr(self.metrics, attr, None)
        if isinstance(counter, Counter) and gain > 0:
            (counter.labels(**labels) if labels else counter).inc(gain)

    def forget(self, process: str) -> None:
        """`process` is gone: its gauges with it."""
        self.gauges.pop(process, None)
