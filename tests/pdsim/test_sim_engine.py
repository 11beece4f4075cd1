"""The simulated engine's step model: vLLM's token budget, and what a prompt chunk in a step
costs the decodes beside it, on an engine that prefills for others and decodes (role both).

The engine runs on a virtual clock here (its sleep advances the clock), so each step's cost is
read exactly, without timing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from pdsim.config import SimConfig, Timing
from pdsim.engine import Engine, Sequence, plan_running, step_ms
from pdsim.metrics import Metrics
from pdsim.model import SamplingSpec
from pdsim.profile import PROFILES, build_timing, load_profile
from pdsim.tokenizer import SimTokenizer

H200 = build_timing(load_profile("h200-llama-8b-bf16"), {}, 1.0)


def load_profile_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROFILES / f"{name}.json").read_text())
    return data


class VirtualClock:
    """A clock that only moves when the engine sleeps; records every step's sleep and how many
    tokens each watched sequence had when the step was planned."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps: list[tuple[float, dict[str, int]]] = []
        self.watched: dict[str, Sequence] = {}
        self.stepped = asyncio.Event()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.steps.append((seconds, {k: len(s.gen.token_ids) for k, s in self.watched.items()}))
        self.now += seconds
        self.stepped.set()
        await asyncio.sleep(0)

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():  # the engine's last step may end after its sleep's signal
            self.stepped.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stepped.wait(), 0.01)


def make_engine(clock: VirtualClock, timing: Timing = H200, **config: Any) -> Engine:
    cfg = SimConfig(timing=timing, **config)

    def kv_params(seq: Sequence, num_tokens: int) -> dict[str, Any]:
        return {"remote_request_id": seq.request_id, "num_tokens": num_tokens}

    return Engine(cfg, SimTokenizer(), Metrics(), kv_params, clock.sleep, clock.time)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [100 + (i * 7 + salt) % 300 for i in range(n)]


async def settle(engine: Engine, clock: VirtualClock, steps: int) -> None:
    target = len(clock.steps) + steps
    await clock.until(lambda: len(clock.steps) >= target)


def test_plan_running_grants_decodes_then_prompt_chunks_under_the_budget() -> None:
    class S:
        def __init__(self, left: int) -> None:
            self.prefill_left = left

    running: list[Any] = [S(0), S(0), S(5000), S(0), S(4000)]
    # a decode needs one token; the budget runs out in the last prompt
    assert plan_running(running, 8192) == [1, 1, 5000, 1, 3189]
    assert plan_running(running, 2) == [1, 1, 0, 0, 0]
    assert plan_running([], 8192) == []


@pytest.mark.parametrize(
    ("decodes", "tokens", "expected"),
    [
        (16, 0, 4.7305 + 0.01999 * 16),
        (16, 8176, 4.7305 + 0.01999 * 16 + 0.023109 * 8176),
        (0, 1, 4.7305 + 0.023109),
    ],
)
def test_step_ms_is_the_linear_model(decodes: int, tokens: int, expected: float) -> None:
    assert step_ms(H200, decodes, tokens) == pytest.approx(expected)


def test_a_long_prefill_for_another_engine_slows_every_decode_beside_it() -> None:
    asyncio.run(_test_a_long_prefill_for_another_engine_slows_every_decode_beside_it())


async def _test_a_long_prefill_for_another_engine_slows_every_decode_beside_it() -> None:
    clock = VirtualClock()
    engine = make_engine(clock)
    try:
        streams = [
            engine.submit(f"s{i}", prompt(64, i), SamplingSpec(400, ignore_eos=True), 0, False)
            for i in range(16)
        ]
        clock.watched = {s.request_id: s for s in streams}
        await settle(engine, clock, 5)  # every stream is decoding
        assert all(s.started_decode and s.prefill_left == 0 for s in streams)
        before = len(clock.steps)
        # a prefill for another engine's decode: one token, KV held for the pull
        long = engine.submit("p", prompt(8192, 99), SamplingSpec(1), 0, produce_kv=True)
        await settle(engine, clock, 4)
        durations = [d for d, _ in clock.steps[before:]]
        lone = step_ms(H200, 16, 0) / 1000
        # the budget of 8192 holds the 16 decodes and 8176 prompt tokens; the rest next step
        assert durations[0] == pytest.approx(step_ms(H200, 16, 8176) / 1000)
        assert durations[1] == pytest.approx(step_ms(H200, 16, 16) / 1000)
        assert durations[2] == pytest.approx(lone)
        assert durations[0] > 30 * lone
        # every decode advanced exactly one token in the long step, as in every other step
        counts = [c for _, c in clock.steps[before : before + 4]]
        for key in clock.watched:
            assert [b[key] - a[key] for a, b in itertools.pairwise(counts)] == [1, 1, 1]
        # the prefill finished with its KV held for a consumer to pull
        assert long.finished and long.kv_transfer_params is not None
        assert long.kv_transfer_params["num_tokens"] == 8192
        assert engine.pool.held_blocks == -(-8192 // 16)
    finally:
        await engine.close()


def test_a_pulled_prompt_costs_its_decoder_one_token() -> None:
    asyncio.run(_test_a_pulled_prompt_costs_its_decoder_one_token())


async def _test_a_pulled_prompt_costs_its_decoder_one_token() -> None:
    clock = VirtualClock()
    engine = make_engine(clock)
    try:
        stream = engine.submit("s", prompt(64), SamplingSpec(100, ignore_eos=True), 0, False)
        clock.watched = {"s": stream}
        await settle(engine, clock, 3)
        before = len(clock.steps)
        pulled = engine.submit("d", prompt(6000, 5), SamplingSpec(10, ignore_eos=True), 6000, False)
        await settle(engine, clock, 2)
        assert clock.steps[before][0] == pytest.approx(step_ms(H200, 1, 1) / 1000)
        assert pulled.started_decode
    finally:
        await engine.close()


def test_late_steps_are_caught_up_and_a_stall_is_counted() -> None:
    asyncio.run(_test_late_steps_are_caught_up_and_a_stall_is_counted())


async def _test_late_steps_are_caught_up_and_a_stall_is_counted() -> None:
    clock = VirtualClock()
    late = [0.001] * 10 + [0.050] + [0.0] * 30  # 1 ms late ten times (a busy CPU), one stall

    async def busy_sleep(seconds: float) -> None:
        await clock.sleep(seconds)
        clock.now += late.pop(0) if late else 0.0

    cfg = SimConfig(timing=H200)
    metrics = Metrics()
    engine = Engine(cfg, SimTokenizer(), metrics, lambda s, n: {}, busy_sleep, clock.time)
    try:
        engine.submit("s", prompt(64), SamplingSpec(40, ignore_eos=True), 0, False)
        await clock.until(lambda: metrics.generation_tokens >= 40)
        assert metrics.steps == 40
        model = step_ms(H200, 0, 64) / 1000 + 39 * step_ms(H200, 1, 0) / 1000
        assert metrics.step_model_seconds == pytest.approx(model)
        # each late step's successor sleeps that much less: only the stall (beyond one step's
        # time, so not caught up) and the last late millisecond remain
        assert metrics.step_wall_seconds == pytest.approx(model + 0.050, abs=0.0011)
    finally:
        await engine.close()


# -- calibration: the H200 profile's step model against the measurements it was fitted to --

MEASURED = load_profile_data("h200-llama-8b-bf16")["measured"]


@pytest.mark.parametrize("batch", sorted(int(b) for b in MEASURED["decode_step_ms_p50_by_batch"]))
def test_the_h200_decode_step_is_the_measured_one(batch: int) -> None:
    measured = MEASURED["decode_step_ms_p50_by_batch"][str(batch)]
    assert step_ms(H200, batch, 0) == pytest.approx(measured, rel=0.08)


@pytest.mark.parametrize(
    "tokens", sorted(int(n) for n in MEASURED["prefill_engine_ms_by_prompt_tokens"])
)
def test_the_h200_prefill_of_a_prompt_alone_is_the_measured_one(tokens: int) -> None:
    measured = MEASURED["prefill_engine_ms_by_prompt_tokens"][str(tokens)]
    assert step_ms(H200, 0, tokens) == pytest.approx(measured, rel=0.12)


def test_the_h200_decode_step_beside_a_long_prefill_is_the_measured_one() -> None:
    asyncio.run(_test_the_h200_decode_step_beside_a_long_prefill_is_the_measured_one())


async def _test_the_h200_decode_step_beside_a_long_prefill_is_the_measured_one() -> None:
    """As measured: 16 streams decoding, then one 8192-token prompt arrives; the longest step
    the streams see while it is computed (a step of 8176 prompt tokens and the 16 decodes)."""
    measured = MEASURED["longest_decode_step_ms_beside_a_prefill_of"]["8192"]
    clock = VirtualClock()
    engine = make_engine(clock)
    try:
        streams = [
            engine.submit(f"s{i}", prompt(32, i), SamplingSpec(200, ignore_eos=True), 0, False)
            for i in range(MEASURED["decodes_beside_the_prefill"])
        ]
        await settle(engine, clock, 3)
        before = len(clock.steps)
        engine.submit("long", prompt(8192, 7), SamplingSpec(1), 0, False)
        await settle(engine, clock, 3)
        during = [d * 1000 for d, _ in clock.steps[before:]]
        assert all(not s.finished for s in streams)
        assert max(during) == pytest.approx(measured, rel=0.08)
        # before and after it, the streams' steps are the plain decode step of 16 again
        lone = MEASURED["decode_step_ms_p50_by_batch"]["16"]
        assert during[-1] == pytest.approx(lone, rel=0.08)
    finally:
        await engine.close()
