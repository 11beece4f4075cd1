"""The ratio controller: how many pool engines lean to prefill and how many to decode.

Every `interval` seconds it weighs the load of the last `window` seconds (`LoadWindow`):

    long tokens/s   prompt tokens of requests that want a prefill apart (the plan's long ones)
    local tokens/s  prompt tokens computed where they are answered (short ones)
    streams         answers being generated at once: on average, or now when more (streams
                    that pile up on too few decode engines are counted as they come, not a
                    window later; fewer are believed only as the window forgets)

against one engine's capacity (`Capacity`: prompt tokens per second, decode streams, the share
of it to plan for, and the share of a decode-side engine's time that prompts may take). With x
of the n available pool engines (plus P dedicated prefillers and D decoders) on the prefill
side, the prefill side is at long / (x + P) prefill capacities, and the decode side at the
larger of streams / (n - x + D) stream capacities and local / (n - x + D) of the prefill time
it may spend: every prompt computed on a decode-side engine stalls each stream in its step, so
a decode-side engine keeps at most `decode_prefill_share` of its time for prompts (mean
inter-token latency grows by 1 / (1 - share)). With no prefill side (x + P = 0) the long
prompts are computed on the decode side too. `best_split` takes the x whose busier side is
least busy (`split_costs`): all engines decode when the long prompts fit in the decode side's
share, and more lean to prefill as they outgrow it.

Hysteresis (`RatioController.decide`): the best split replaces the current one only when it
promises a cost lower by more than `hysteresis`, for `hold` decisions in a row, and at least
`min_dwell` seconds after the last change; then one engine moves (the decode-side engine with the
fewest streams to stall, or the prefill-side engine with the least prompt work left). When the
current split is over capacity (its busier side needs more than all of its engines: a queue
grows every second it stays), the move does not wait for `min_dwell` and goes straight to the
best split, as many engines as that takes. A split with no decode side at all is fixed at once.
Engines that are unavailable are left out of n and keep their lean for when they return.
Nothing here touches a request: a lean steers only the plans made after it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.control.workers import Lean


@dataclass(frozen=True, slots=True)
class Capacity:
    """One engine's."""

    prefill_tokens_per_second: float
    decode_streams: int
    target_utilization: float = 0.8
    decode_prefill_share: float = 0.5  # of a decode-side engine's time, prompts may take this


@dataclass(frozen=True, slots=True)
class Demand:
    long_tokens_per_second: float = 0.0
    local_tokens_per_second: float = 0.0
    streams: float = 0.0


class LoadWindow:
    """Prompt tokens and stream counts of the last `window` seconds (now - window, now],
    measured from `start`."""

    def __init__(self, window: float, start: float = 0.0) -> None:
        self.window = window
        self._prompts: deque[tuple[float, int, bool]] = deque()
        self._streams: deque[tuple[float, int]] = deque()
        self._start = start

    def prompt(self, now: float, tokens: int, long: bool) -> None:
        self._prompts.append((now, tokens, long))

    def streams(self, now: float, count: int) -> None:
        self._streams.append((now, count))

    def demand(self, now: float) -> Demand:
        """The rates over the window (over the time since `start`, while that is shorter); the
        streams' mean, or the last sample when that is higher."""
        cutoff = now - self.window
        while self._prompts and self._prompts[0][0] <= cutoff:
            self._prompts.popleft()
        while self._streams and self._streams[0][0] <= cutoff:
            self._streams.popleft()
        span = min(self.window, now - self._start)
        if span <= 0:
            return Demand()
        long = sum(t for _, t, is_long in self._prompts if is_long)
        local = sum(t for _, t, is_long in self._prompts if not is_long)
        streams = 0.0
        if self._streams:
            mean = sum(c for _, c in self._streams) / len(self._streams)
            streams = max(mean, float(self._streams[-1][1]))
        return Demand(long / span, local / span, streams)


def split_costs(
    demand: Demand, pool: int, capacity: Capacity, prefill: int = 0, decode: int = 0
) -> list[float]:
    """The cost of each split x = 0..pool (x pool engines lean to prefill, beside `prefill`
    dedicated prefillers and `decode` dedicated decoders): the utilization of the busier side,
    against `target_utilization` of each engine's capacity (inf: no side to put the load on)."""
    per_prefill = capacity.prefill_tokens_per_second * capacity.target_utilization
    per_stream = capacity.decode_streams * capacity.target_utilization
    per_local = per_prefill * capacity.decode_prefill_share
    costs = []
    for x in range(pool + 1):
        p, d = x + prefill, pool - x + decode
        long = demand.long_tokens_per_second
        local = demand.local_tokens_per_second
        if p == 0:  # the long prompts are served where they are decoded
            local, long = local + long, 0.0
        rho_p = long / (per_prefill * p) if p else 0.0
        if d:
            rho_d = max(demand.streams / per_stream, local / per_local if per_local else 0.0) / d
        else:
            rho_d = math.inf if pool or decode else 0.0
        costs.append(max(rho_p, rho_d))
    return costs


def best_split(costs: Sequence[float], current: int) -> int:
    """The cheapest split; on a tie the one nearest the current (then fewer prefill engines)."""
    return min(range(len(costs)), key=lambda x: (costs[x], abs(x - current), x))


@dataclass(frozen=True, slots=True)
class EngineState:
    """A pool engine as the controller sees it."""

    id: str
    available: bool
    lean: Lean
    decode_streams: int = 0
    prefill_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    id: str
    lean: Lean
    prefill: int  # available pool engines leaning to prefill after the change
    decode: int
    why: str


class RatioController:
    def __init__(
        self,
        capacity: Capacity,
        window: float,
        hysteresis: float = 0.15,
        hold: int = 3,
        min_dwell: float = 5.0,
        start: float = 0.0,
    ) -> None:
        self.capacity = capacity
        self.load = LoadWindow(window, start)
        self.hysteresis = hysteresis
        self.hold = hold
        self.min_dwell = min_dwell
        self.last_change = -math.inf
        self._agree = 0  # decisions in a row that wanted the same other split
        self._wanted: int | None = None
        self.last_demand = Demand()
        self.last_costs: list[float] = []
        self.target: int | None = None  # the split the last decision wanted

    def decide(
        self,
        now: float,
        engines: Sequence[EngineState],
        prefill: int = 0,
        decode: int = 0,
    ) -> list[Change]:
        """One decision over the available pool `engines` (with `prefill`/`decode` dedicated
        ones beside): the engines to move (none, one, or, over capacity, as many as the best
        split takes)."""
        up = [e for e in engines if e.available]
        demand = self.load.demand(now)
        self.last_demand = demand
        current = sum(1 for e in up if e.lean == "prefill")
        costs = split_costs(demand, len(up), self.capacity, prefill, decode)
        self.last_costs = costs
        if not up:
            self.target = None
            return []
        best = best_split(costs, current)
        self.target = best
        if best == current:
            self._agree, self._wanted = 0, None
            return []
        infeasible = math.isinf(costs[current])
        over = costs[current] * self.capacity.target_utilization > 1.0
        gain = costs[current] > costs[best] * (1 + self.hysteresis)
        if not (infeasible or gain):
            self._agree, self._wanted = 0, None
            return []
        self._agree = self._agree + 1 if self._wanted == best else 1
        self._wanted = best
        dwelling = now - self.last_change < self.min_dwell and not over
        if not infeasible and (self._agree < self.hold or dwelling):
            return []
        self.last_change = now
        self._agree, self._wanted = 0, None
        why = (
            f"over the last {self.load.window:g}s: {demand.long_tokens_per_second:.0f} long "
            f"prompt tokens/s, {demand.local_tokens_per_second:.0f} local, "
            f"{demand.streams:.1f} streams; busier side at {costs[current]:.0%} of capacity "
            f"with {current} prefilling, {costs[best]:.0%} with {best}"
        )
        moves = abs(best - current) if over and not infeasible else 1
        lean: Lean = "prefill" if best > current else "decode"
        movers = _movers(up, lean)
        step = 1 if lean == "prefill" else -1
        return [
            Change(e.id, lean, current + step * (i + 1), len(up) - current - step * (i + 1), why)
            for i, e in enumerate(movers[:moves])
        ]


def _movers(engines: Sequence[EngineState], to: Lean) -> list[EngineState]:
    """The engines that may turn to `to`, the best first: to prefill, the decode-side engines
    with fewest streams; to decode, the prefill-side ones with least prompt work."""
    if to == "prefill":
        return sorted(
            (e for e in engines if e.lean == "decode"),
            key=lambda e: (e.decode_streams, e.prefill_tokens, e.id),
        )
    return sorted(
        (e for e in engines if e.lean == "prefill"),
        key=lambda e: (e.prefill_tokens, e.decode_streams, e.id),
    )
