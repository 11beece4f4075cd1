"""Latency statistics: bounded rolling windows (numpy) for the log and /stats, and Prometheus
histograms of the same quantities.

Memory is fixed at start-up: each window is a preallocated ring of `window` float64 values.

The histograms are `Buckets`, not prometheus_client's Histogram: every finished request observes
up to six of them, in the one process or, with serving processes, in the control process for all
of them, and prometheus_client's observe takes a lock per bucket and per sum (about 1 µs each
here, 6 µs a request). A `Buckets` is one bisect and two additions, written only from the event
loop's thread, and is exposed as the same histogram (its buckets, _count, _sum and _created).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class Described(Protocol):
    """A request's plan as its timeline shows it (proxy.place.plan.Plan)."""

    def describe(self) -> dict[str, Any]: ...


_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class RollingWindow:
    """The last `capacity` values added, in a fixed numpy ring."""

    __slots__ = ("_count", "_next", "_values")

    def __init__(self, capacity: int) -> None:
        self._values = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        self._count = 0

    def add(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)
        if self._count < len(self._values):
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def values(self) -> np.ndarray:
        return self._values[: self._count] if self._count < len(self._values) else self._values


class Buckets:
    """One Prometheus histogram without labels, observed from one thread (see the module's
    docstring), registered in `registry` as a collector."""

    __slots__ = ("_bounds", "_counts", "_created", "_sum", "documentation", "name")

    def __init__(
        self, name: str, documentation: str, bounds: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = sorted(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # le: value <= bound
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]  # how Histogram writes it
            buckets.append((le, float(cumulative)))
        family.add_metric([], buckets, self._sum)
        family.add_sample(f"{self.name}_created", {}, self._created)
        yield family


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary | None:
        if len(values) == 0:
            return None
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return cls(len(values), float(values.mean()), float(p50), float(p95), float(p99))


@dataclass(slots=True)
class RequestTiming:
    """perf_counter() instants of one request's life; None where the request never got there.
    The rest says where it went and how it ended, for its timeline (proxy.timeline)."""

    start: float
    admitted: float | None = None  # admission gave it a slot
    prefill_start: float | None = None
    prefill_end: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    token_events: int = 0
    output_tokens: int = 0  # streamed: the usage chunk's completion_tokens, else token events
    end: float | None = None
    path: str = ""
    request_id: str = ""
    stream: bool = False
    status: int = 0
    prefiller: str | None = None  # worker ids: the last tried
    decoder: str | None = None
    kv: str | None = None  # "handed_over", "local" (chosen), or why the decoder recomputed
    retries: int = 0
    plan: Described | None = None  # where the planner put it, and why
    error: str | None = None  # the message the client got, if an error
    # where the stream moved to another decoder mid-answer (proxy.flow.migrate), in order
    seams: list[dict[str, Any]] = field(default_factory=list)

    def seam(self, failed: str, reason: str, moved: int, after: RequestTiming) -> None:
        """Take in the continuation (`after`) of this stream, whose decoder `failed` after
        `moved` tokens: the client's gap between the last token before and the first after."""
        gap = None
        if after.first_token is not None and self.last_token is not None:
            gap = round((after.first_token - self.last_token) * 1e3, 3)
        to = after.seams[0]["from"] if after.seams else after.decoder  # it moved on again
        self.seams.append(
            {"from": failed, "to": to, "reason": reason, "tokens_moved": moved, "gap_ms": gap,
             "kv": after.kv}
        )  # fmt: skip
        self.seams += after.seams
        self.first_token = self.first_token or after.first_token  # a whole answer asked again
        self.decoder = after.decoder
        self.last_token = after.last_token or self.last_token
        self.token_events += after.token_events
        self.output_tokens = moved + after.output_tokens
        self.retries += after.retries


# name -> (help text, Prometheus buckets)
QUANTITIES: dict[str, tuple[str, tuple[float, ...]]] = {
    "prefill": ("prefill leg: request sent to prefiller until its answer", _LATENCY_BUCKETS),
    "decode_first_token": ("prefill done until the decoder's first token", _LATENCY_BUCKETS),
    "ttft": ("time to first token as the client sees it", _LATENCY_BUCKETS),
    "itl": ("mean inter-token latency of a streamed request", _ITL_BUCKETS),
    "tpot": (
        "time per output token of a streamed request, after the first: (last - first token) / "
        "(output tokens - 1); below ITL when chunks carry several tokens",
        _ITL_BUCKETS,
    ),
    "e2e": ("request received until its last byte was sent", _LATENCY_BUCKETS),
}


class LatencyStats:
    def __init__(self, window: int, registry: CollectorRegistry) -> None:
        self.windows = {name: RollingWindow(window) for name in QUANTITIES}
        self.histograms = {
            name: Buckets(f"pdproxy_{name}_seconds", help_text, buckets, registry)
            for name, (help_text, buckets) in QUANTITIES.items()
        }
        self.recorded = 0

    def _add(self, name: str, seconds: float) -> None:
        self.windows[name].add(seconds)
        self.histograms[name].observe(seconds)

    def record(self, t: RequestTiming) -> None:
        """Record a finished request's timings (only the parts it reached)."""
        self.recorded += 1
        if t.prefill_start is not None and t.prefill_end is not None:
            self._add("prefill", t.prefill_end - t.prefill_start)
        if t.first_token is not None:
            self._add("ttft", t.first_token - t.start)
            if t.prefill_end is not None:
                self._add("decode_first_token", t.first_token - t.prefill_end)
            if t.last_token is not None:
                if t.token_events > 1:
                    self._add("itl", (t.last_token - t.first_token) / (t.token_events - 1))
                if t.output_tokens > 1:
                    self._add("tpot", (t.last_token - t.first_token) / (t.output_tokens - 1))
        if t.end is not None:
            self._add("e2e", t.end - t.start)

    def summaries(self) -> dict[str, Summary | None]:
        return {name: Summary.of(w.values()) for name, w in self.windows.items()}

    def report(self) -> str:
        """A block for the log, in milliseconds."""
        lines = [f"pdproxy latency over the last {len(self.windows['e2e'])} requests (ms):"]
        columns = ("mean", "p50", "p95", "p99")
        lines.append(f"  {'':<20}{'count':>8}" + "".join(f"{c:>11}" for c in columns))
        for name, summary in self.summaries().items():
            if summary is None:
                lines.append(f"  {name:<20}{0:>8}" + f"{'-':>11}" * len(columns))
            else:
                values = (getattr(summary, c) * 1e3 for c in columns)
                lines.append(
                    f"  {name:<20}{summary.count:>8}" + "".join(f"{v:>11.2f}" for v in values)
                )
        return "\n".join(lines)
