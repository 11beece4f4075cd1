"""The shared admission across real serving processes: one global limit, one queue ordered by
priority then arrival whichever process a waiter lives in, eviction and timeouts as 429s, no slot
held by a waiter that left, and nothing wedged by a process that dies. The test is the control
process: it creates the table, reads it, and drives two serving processes A and B."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import pytest

from proxy.procs.admission import reset_process
from proxy.procs.slots import SlotTable
from tests.procs.agents import Agent, admission_agents, wait_until

Setup = Callable[..., tuple[SlotTable, Agent, Agent]]


@pytest.fixture
def setup() -> Iterator[Setup]:
    """A table for two serving processes, and the two, started."""
    made: list[tuple[SlotTable, list[Agent]]] = []

    def start(
        max_concurrent: int, max_queue: int = 8, queue_timeout: float = 30
    ) -> tuple[SlotTable, Agent, Agent]:
        table = SlotTable.create(2, max_concurrent, max_queue, queue_timeout)
        agents = admission_agents(table, 2)
        made.append((table, agents))
        return table, agents[0], agents[1]

    yield start
    for table, agents in made:
        for agent in agents:
            agent.stop()
        table.close()
        table.unlink()


def hold(agent: Agent, name: str = "hold") -> None:
    """`agent` takes a slot and keeps it until released."""
    agent.send("request", name, 0)
    agent.expect("admitted", name)


def queue(table: SlotTable, agent: Agent, name: str, priority: int) -> None:
    """`agent` asks for a slot and waits in the queue (seen in the table before going on)."""
    queued = table.queued
    agent.send("request", name, priority, 0.05)
    wait_until(lambda: table.queued == queued + 1)


def served(agents: list[tuple[Agent, list[str]]]) -> list[str]:
    """The names each agent was admitted for, in the order of admission across the agents."""
    admitted = [agent.expect("admitted", name) for agent, names in agents for name in names]
    return [event[1] for event in sorted(admitted, key=lambda event: event[2])]


def test_the_limit_is_global_across_processes(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=2)
    names = {a: ["a1", "a2", "a3"], b: ["b1", "b2", "b3"]}
    for agent, mine in names.items():
        for name in mine:
            agent.send("request", name, 0, 0.3)
    spans, seen = [], []
    for agent, mine in names.items():
        for name in mine:
            _, _, start, active = agent.expect("admitted", name)
            spans.append((start, agent.expect("done", name)[2]))
            seen.append(active)
    overlap = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert overlap <= 2 and max(seen) <= 2  # four would run at once with a limit per process
    wait_until(lambda: (table.active, table.queued) == (0, 0))


def test_priority_wins_across_processes(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    hold(a)
    queue(table, a, "a5-1", 5)
    queue(table, a, "a5-2", 5)
    queue(table, b, "b0-1", 0)  # later, but a better priority, in the other process
    queue(table, b, "b0-2", 0)
    a.send("release", "hold")
    order = served([(a, ["a5-1", "a5-2"]), (b, ["b0-1", "b0-2"])])
    assert order == ["b0-1", "b0-2", "a5-1", "a5-2"]
    wait_until(lambda: (table.active, table.queued) == (0, 0))


def test_first_come_first_served_within_a_priority_across_processes(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    hold(a)
    queue(table, a, "1", 3)
    queue(table, b, "gone", 3)
    queue(table, a, "2", 3)
    b.send("cancel", "gone")  # a hole in the table: "3" is stored ahead of "2"
    b.expect("cancelled", "gone")
    for agent, name in [(b, "3"), (a, "4"), (b, "5"), (b, "6")]:
        queue(table, agent, name, 3)
    a.send("release", "hold")
    assert served([(a, ["1", "2", "4"]), (b, ["3", "5", "6"])]) == ["1", "2", "3", "4", "5", "6"]


def test_a_full_queue_evicts_the_worst_waiter_in_the_other_process(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1, max_queue=2)
    hold(a)
    queue(table, b, "batch-1", 10)
    queue(table, b, "batch-2", 10)
    a.send("request", "same", 10, 0.05)  # no better than the worst waiter: turned away
    assert "at its limit of 1 concurrent requests and 2 queued" in a.expect("rejected", "same")[2]
    a.send("request", "urgent", 0, 0.05)
    message = b.expect("rejected", "batch-2")[2]  # the latest of the worst, in B, loses its place
    assert "better priority (lower than 10)" in message
    assert (table.queued, table.rejected) == (2, 2)
    a.send("release", "hold")
    assert served([(a, ["urgent"]), (b, ["batch-1"])]) == ["urgent", "batch-1"]
    wait_until(lambda: (table.active, table.queued) == (0, 0))


def test_a_grant_whose_ring_was_lost_is_seen_by_the_poll(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    a.send("configure", 3600, False)  # A's rings are lost
    a.expect("configured")
    b.send("configure", 0.05, True)
    b.expect("configured")
    hold(a)
    queue(table, b, "next", 0)
    a.send("release", "hold")
    b.expect("admitted", "next")


def test_a_queue_timeout_is_a_429(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1, queue_timeout=0.5)
    hold(a)
    b.send("request", "late", 0, 0.05)
    assert "waited 0.5s in the proxy's queue" in b.expect("rejected", "late")[2]
    assert (table.active, table.queued, table.rejected) == (1, 0, 1)


def test_a_cancelled_waiter_does_not_hold_a_slot(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    hold(a)
    queue(table, b, "gone", 0)
    b.send("cancel", "gone")
    b.expect("cancelled", "gone")
    assert table.queued == 0
    a.send("release", "hold")
    wait_until(lambda: table.active == 0)
    hold(a, "next")  # the slot is free for the next request at once


def test_a_waiter_cancelled_as_its_grant_comes_passes_the_slot_on(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    hold(a)
    queue(table, b, "gone", 0)
    queue(table, a, "after", 0)
    b.send("stall_then_cancel", "gone")
    b.expect("stalling", "gone")  # B's loop is blocked: it sees nothing until the gate opens
    a.send("release", "hold")
    wait_until(lambda: table.queued == 1)  # the slot went to B's waiter, in its row
    b.gate.set()  # B cancels the waiter before it looks at the row: it must pass the slot on
    b.expect("cancelled", "gone")
    a.expect("admitted", "after")
    wait_until(lambda: (table.active, table.queued) == (0, 0))


def test_a_dead_process_slots_and_waiters_are_freed(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    hold(a)
    queue(table, a, "dies-waiting", 0)
    queue(table, b, "next", 5)
    a.kill()  # holding the slot, with a waiter
    reset_process(table, 0)
    b.expect("admitted", "next")  # the freed slot skips the dead waiter
    wait_until(lambda: (table.active, table.queued) == (0, 0))


def test_a_process_killed_holding_the_lock_does_not_wedge_the_others(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=1)
    a.send("lock_and_hang")
    a.expect("locked")
    a.kill()
    hold(b)  # the kernel dropped the dead holder's lock
    assert table.active == 1


def test_unlimited_admission_takes_no_lock(setup: Setup) -> None:
    table, a, b = setup(max_concurrent=0, max_queue=0)
    with table.segment.locked():  # the control process holds the lock throughout
        for name in ["a1", "a2"]:
            hold(a, name)
        hold(b, "b1")
        wait_until(lambda: table.active == 3)
    for name in ["a1", "a2"]:
        a.send("release", name)
    b.send("release", "b1")
    wait_until(lambda: table.active == 0)


def test_a_busy_mix_keeps_the_limit_and_ends_with_nothing_held(setup: Setup) -> None:
    """Both processes at once: random priorities and holds, 429s of every kind, cancels."""
    table, a, b = setup(max_concurrent=3, max_queue=6, queue_timeout=0.4)
    rng = random.Random(7)
    names = {a: [f"a{i}" for i in range(30)], b: [f"b{i}" for i in range(30)]}
    for i in range(30):
        for agent in (a, b):
            agent.send("request", names[agent][i], rng.randrange(4), rng.uniform(0, 0.03))
        if i % 7 == 3:
            a.send("cancel", names[a][i])
        time.sleep(0.005)
    spans, outcomes = [], []
    for agent, mine in names.items():
        for name in mine:
            event = agent.expect(("admitted", "rejected", "cancelled"), name)
            if event[0] == "admitted":
                spans.append((event[2], agent.expect(("done", "cancelled"), name)[-1]))
            outcomes.append(event[0])
    starts = [start for start, _ in spans]
    assert max(sum(s <= t < e for s, e in spans if isinstance(e, float)) for t in starts) <= 3
    assert outcomes.count("admitted") >= 3 and len(outcomes) == 60
    wait_until(lambda: (table.active, table.queued) == (0, 0))
