"""The ratio controller: its cost function, and how it follows load that steps, oscillates, and
loses an engine (a fake clock; one decision per simulated second)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from proxy.control.ratio import (
    Capacity,
    Demand,
    EngineState,
    LoadWindow,
    RatioController,
    best_split,
    split_costs,
)
from proxy.control.workers import Lean

CAP = Capacity(prefill_tokens_per_second=10_000, decode_streams=10, target_utilization=1.0)
assert CAP.decode_prefill_share == 0.5


def test_load_window_rates_and_streams_mean_or_rising() -> None:
    w = LoadWindow(10.0, start=0.0)
    assert w.demand(0.0) == Demand()
    w.prompt(0.0, 1000, True)
    w.prompt(1.0, 300, False)
    w.streams(1.0, 4)
    w.streams(2.0, 2)
    d = w.demand(2.0)  # two seconds of history so far
    assert d == Demand(500.0, 150.0, 3.0)  # falling streams: their mean
    w.streams(2.5, 15)
    assert w.demand(2.5).streams == 15.0  # rising: counted as they come
    w.streams(3.0, 0)
    assert w.demand(3.0).streams == pytest.approx(21 / 4)
    w.prompt(11.5, 2000, True)
    d = w.demand(13.0)  # the first prompts and samples fell out of the window
    assert d.long_tokens_per_second == pytest.approx(200.0)
    assert d.local_tokens_per_second == 0.0 and d.streams == 0.0  # (3, 13]: none left


@pytest.mark.parametrize(
    ("demand", "pool", "dedicated", "costs"),
    [
        # prefill-heavy: 3 engines' worth of long prompts, a little decoding; computed on the
        # decode side they may take half of its time
        (Demand(30_000, 0, 5), 4, (0, 0), [6.0 / 4, 3.0, 1.5, 1.0, math.inf]),
        # decode-heavy: all decoding is best
        (Demand(0, 2_000, 30), 4, (0, 0), [0.75, 1.0, 1.5, 3.0, math.inf]),
        # a dedicated decoder makes all-prefill possible
        (Demand(20_000, 0, 5), 2, (0, 1), [4.0 / 3, 2.0, 1.0]),
        # a few long prompts among much decoding: they fit in the decode side's share
        (Demand(4_000, 0, 20), 4, (0, 0), [0.5, 2.0 / 3, 1.0, 2.0, math.inf]),
        # nothing to do: every split costs nothing but all-prefill, which has no decode side
        (Demand(), 2, (0, 0), [0.0, 0.0, math.inf]),
    ],
)
def test_split_costs(
    demand: Demand, pool: int, dedicated: tuple[int, int], costs: list[float]
) -> None:
    got = split_costs(demand, pool, CAP, *dedicated)
    assert got == pytest.approx(costs)


def test_best_split_prefers_the_current_on_a_tie() -> None:
    assert best_split([0.0, 0.0, math.inf], current=1) == 1
    assert best_split([0.0, 0.0, math.inf], current=0) == 0
    assert best_split([0.9, 0.5, 0.7], current=0) == 1


class Pool:
    """Four pool engines and a controller on a fake clock, fed a demand each second."""

    def __init__(self, n: int = 4, hold: int = 3, min_dwell: float = 5.0) -> None:
        self.now = 0.0
        self.leans: dict[str, Lean] = {f"b{i}": "decode" for i in range(n)}
        self.down: set[str] = set()
        self.ctl = RatioController(
            CAP, window=10.0, hysteresis=0.15, hold=hold, min_dwell=min_dwell
        )
        self.changes: list[tuple[float, str, Lean]] = []

    @property
    def prefill(self) -> int:
        return sum(1 for k, v in self.leans.items() if v == "prefill" and k not in self.down)

    def run(self, seconds: int, long_tps: Callable[[float], float], streams: float = 2.0) -> None:
        for _ in range(seconds):
            self.now += 1.0
            self.ctl.load.prompt(self.now, int(long_tps(self.now)), True)
            self.ctl.load.streams(self.now, round(streams))
            engines = [EngineState(k, k not in self.down, v) for k, v in self.leans.items()]
            for change in self.ctl.decide(self.now, engines):
                self.leans[change.id] = change.lean
                self.changes.append((self.now, change.id, change.lean))


def test_a_step_up_beyond_the_decode_sides_capacity_moves_straight_to_the_best_split() -> None:
    pool = Pool()
    pool.run(20, lambda t: 0)
    assert pool.prefill == 0 and not pool.changes
    # 2.5 engines' worth of prompts: all decoding, they would need 125% of their time
    pool.run(60, lambda t: 25_000)
    assert pool.prefill == 3  # 3 prefilling, 1 decoding: prefill side at 83%
    assert [lean for _, _, lean in pool.changes] == ["prefill"] * 3
    # the window fills over 10 s: a first move while the measured load is still within
    # capacity, then the rest at once, without waiting out min_dwell (5 s) between them
    times = [t for t, _, _ in pool.changes]
    assert times == [24.0, 27.0, 27.0]


def test_within_capacity_engines_move_one_at_a_time_min_dwell_apart() -> None:
    pool = Pool()
    pool.run(60, lambda t: 25_000)
    moved = len(pool.changes)
    pool.run(60, lambda t: 0, streams=8)  # no more long prompts, fewer streams than 1 engine
    assert pool.prefill == 0
    back = pool.changes[moved:]
    assert [lean for _, _, lean in back] == ["decode"] * 3
    assert all(b[0] - a[0] >= 5.0 for a, b in itertools.pairwise(back))  # min_dwell


def test_a_step_down_moves_them_back_and_then_holds_still() -> None:
    pool = Pool()
    pool.run(60, lambda t: 25_000)
    assert pool.prefill == 3
    moved = len(pool.changes)
    pool.run(60, lambda t: 0, streams=25)  # chat: 2.5 engines' worth of streams
    assert pool.prefill == 0
    assert all(lean == "decode" for _, _, lean in pool.changes[moved:])
    settled = len(pool.changes)
    pool.run(60, lambda t: 0, streams=25)
    assert len(pool.changes) == settled  # nothing more to gain: no change


def test_load_that_oscillates_faster_than_the_window_does_not_flap() -> None:
    pool = Pool()
    # 4 s of 40k prompt tokens/s, 4 s of none: the 10 s window sees 16k to 24k, for which
    # 3 prefilling is best throughout
    pool.run(120, lambda t: 40_000 if int(t) % 8 < 4 else 0, streams=5)
    assert pool.prefill == 3
    assert [lean for _, _, lean in pool.changes] == ["prefill"] * 3
    assert all(t < 40 for t, _, _ in pool.changes)  # settled early; nothing since


def test_a_gain_below_the_hysteresis_is_not_taken() -> None:
    ctl = RatioController(CAP, window=10.0, hysteresis=0.15, hold=1, min_dwell=0.0)
    engines = [EngineState(f"b{i}", True, "prefill" if i < 2 else "decode") for i in range(4)]
    for t in range(1, 31):
        ctl.load.prompt(float(t), 12_000, True)
        ctl.load.streams(float(t), 5 + t % 2)  # 5.5 on average
        assert ctl.decide(float(t), engines) == []
    # 3 prefilling would be best (55% against 60% busy), but not by 15%
    assert ctl.target == 3
    assert ctl.last_costs[2] == pytest.approx(0.6)
    assert ctl.last_costs[3] == pytest.approx(0.55, rel=0.02)


def test_a_change_waits_for_hold_decisions_in_a_row() -> None:
    ctl = RatioController(CAP, window=10.0, hysteresis=0.15, hold=3, min_dwell=0.0)
    engines = [EngineState(f"b{i}", True, "decode") for i in range(4)]
    moved = []
    for t in range(1, 6):
        ctl.load.prompt(float(t), 30_000, True)
        moved.append(ctl.decide(float(t), engines) != [])
    assert moved == [False, False, True, False, False]  # 3 in a row; then the count starts over


def test_an_engine_that_dies_is_replaced_at_once_when_no_decode_side_is_left() -> None:
    pool = Pool()
    pool.run(60, lambda t: 25_000)
    assert pool.prefill == 3
    decoder = next(k for k, v in pool.leans.items() if v == "decode")
    pool.down.add(decoder)  # the only decode-side engine dies: all 3 left prefill
    before = len(pool.changes)
    pool.run(1, lambda t: 25_000)
    assert len(pool.changes) == before + 1  # no hold, no dwell: there is no decode side
    assert pool.changes[-1][2] == "decode"
    assert pool.prefill == 2
    # it comes back with its old lean (decode): the split is 2 + 2 now, and the controller
    # moves one more to prefill after the usual hold
    pool.down.clear()
    pool.run(30, lambda t: 25_000)
    assert pool.prefill == 3


def test_a_dying_prefill_engine_leaves_the_best_split_of_those_left() -> None:
    pool = Pool()
    pool.run(60, lambda t: 20_000, streams=5)
    assert pool.prefill == 3
    moved = len(pool.changes)
    prefiller = next(k for k, v in pool.leans.items() if v == "prefill")
    pool.down.add(prefiller)
    pool.run(30, lambda t: 20_000, streams=5)
    # of three engines, two prefilling is best (100% against 133% all decoding, 200% with one)
    assert pool.prefill == 2 and len(pool.changes) == moved
    assert pool.ctl.last_costs == pytest.approx([4 / 3, 2.0, 1.0, math.inf])
    pool.down.clear()  # back, with its lean: 3 prefilling again, no change needed
    pool.run(10, lambda t: 20_000, streams=5)
    assert pool.prefill == 3 and len(pool.changes) == moved


def test_no_available_engine_decides_nothing() -> None:
    pool = Pool(n=2)
    pool.down = {"b0", "b1"}
    pool.run(10, lambda t: 25_000)
    assert pool.changes == [] and pool.ctl.target is None
