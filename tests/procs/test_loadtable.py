"""The shared load table across real processes: each serving process writes its own column, any
process reads the sums; a dead process's column is reset; a reused slot is seen as new."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.control.workers import WorkerPool
from proxy.procs.loadtable import DECODE_STREAMS, PREFILL_TOKENS, LoadTable
from proxy.procs.snapshot import SharedWorker
from tests.procs.agents import DEADLINE, Agent, load_agent

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def table() -> Iterator[LoadTable]:
    table = LoadTable.create(columns=2, slots=4)
    yield table
    table.close()
    table.unlink()


@pytest.fixture
def agents(table: LoadTable) -> Iterator[list[Agent]]:
    started = [Agent(load_agent, table.name, column) for column in range(2)]
    yield started
    for agent in started:
        agent.stop()


def call(agent: Agent, *command: object) -> tuple[int, int, bool]:
    """Send one load-table command; the row as that process then reads it."""
    agent.send(*command)
    _, inflight, chars, current = agent.expect("row")
    return inflight, chars, current


def test_two_processes_counters_sum(table: LoadTable, agents: list[Agent]) -> None:
    slot, generation = table.assign()
    a, b = agents
    assert call(a, "add", slot, generation, 2, 100) == (2, 100, True)
    assert call(b, "add", slot, generation, 3, 50) == (5, 150, True)  # B sees A's at once
    assert call(a, "read", slot, generation) == (5, 150, True)
    assert (table.inflight(slot), table.chars(slot)) == (5, 150)
    assert call(a, "sub", slot, generation, 2, 100) == (3, 50, True)
    assert call(b, "sub", slot, generation, 3, 50) == (0, 0, True)
    other, _ = table.assign()
    assert (table.inflight(other), table.chars(other)) == (0, 0)


def test_a_dead_process_column_is_reset(table: LoadTable, agents: list[Agent]) -> None:
    slot, generation = table.assign()
    a, b = agents
    call(a, "add", slot, generation, 4, 40)
    call(b, "add", slot, generation, 1, 10)
    a.kill()  # dies with its 4 requests counted
    assert (table.inflight(slot), table.chars(slot)) == (5, 50)
    table.reset_column(0)
    assert (table.inflight(slot), table.chars(slot)) == (1, 10)  # B's own stay
    replacement = Agent(load_agent, table.name, 0)
    try:
        assert call(replacement, "add", slot, generation, 1, 5) == (2, 15, True)
    finally:
        replacement.stop()


def test_a_slot_reused_after_removal_is_seen_as_new() -> None:
    table = LoadTable.create(columns=2, slots=1)
    a = Agent(load_agent, table.name, 0)
    b = Agent(load_agent, table.name, 1)
    try:
        slot, old = table.assign()
        call(a, "add", slot, old, 2, 20)  # a request on the old engine, still in flight
        table.release(slot)  # the old engine is removed
        again, new = table.assign()  # the only slot, so it is reused: zeroed, a new generation
        assert again == slot and new != old
        assert call(b, "read", slot, new) == (0, 0, True)
        assert call(a, "read", slot, old) == (0, 0, False)  # A's old row knows it is stale
        call(a, "sub", slot, old, 2, 20)  # the old request ends: not the new engine's
        assert call(b, "add", slot, new, 1, 7) == (1, 7, True)
        assert (table.inflight(slot), table.chars(slot)) == (1, 7)
    finally:
        a.stop()
        b.stop()
        table.close()
        table.unlink()


def test_assign_prefers_a_freed_slot_that_nothing_is_in_flight_on() -> None:
    table = LoadTable.create(columns=1, slots=2)
    writer = LoadTable.attach(table.name, 0)
    try:
        first, _ = table.assign()
        second, _ = table.assign()
        writer.add(first)  # a late request still counted on the first
        table.release(first)
        table.release(second)
        assert table.assign()[0] == second
        assert table.assign()[0] == first  # the only one left: reused, zeroed
        assert table.inflight(first) == 0
        with pytest.raises(RuntimeError, match="in use"):
            table.assign()
    finally:
        writer.close()
        table.close()
        table.unlink()


def test_the_control_process_has_no_column_to_write() -> None:
    table = LoadTable.create(columns=1, slots=1)
    try:
        slot, generation = table.assign()
        with pytest.raises(IndexError):
            table.add(slot)
        with pytest.raises(IndexError):
            table.row(slot, generation).add()
        assert table.inflight(slot) == 0
    finally:
        table.close()
        table.unlink()


def test_a_serving_process_that_exits_leaves_the_table_to_the_others(table: LoadTable) -> None:
    """Python before 3.13 registers every segment a process attaches with that process's
    resource tracker, which unlinks it when the process exits: a serving process that ends
    would take the table with it. Attaching must leave the tracker out."""
    attach = (
        "import sys\n"
        "from multiprocessing import resource_tracker\n"
        "tracked = []\n"
        "resource_tracker.register = lambda name, rtype: tracked.append(name)\n"
        "from proxy.procs.loadtable import LoadTable\n"
        "table = LoadTable.attach(sys.argv[1], 0)\n"
        "table.add(0)\n"
        "table.close()\n"
        "print(len(tracked))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", attach, table.name],
        timeout=DEADLINE,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (run.returncode, run.stdout.strip()) == (0, "0"), run.stderr
    again = LoadTable.attach(table.name, 1)  # the name is still there
    try:
        assert again.inflight(0) == 1
    finally:
        again.close()


def test_only_the_control_process_manages_slots(table: LoadTable) -> None:
    serving = LoadTable.attach(table.name, 0)
    try:
        for manage in (serving.assign, lambda: serving.release(0), lambda: serving.reset_column(0)):
            with pytest.raises(RuntimeError, match="only the process that created"):
                manage()
    finally:
        serving.close()


def test_the_pool_s_prefill_tokens_and_decode_streams_are_every_process_s(
    table: LoadTable,
) -> None:
    """What the pool places by: a lease in one process moves what the other reads at once, and
    each process's `+=` and `-=` land in its own column only."""
    slot, generation = table.assign()
    mine, theirs = (LoadTable.attach(table.name, column) for column in range(2))
    here = SharedWorker("decode", "d0", "http://d0", mine.row(slot, generation))
    there = SharedWorker("decode", "d0", "http://d0", theirs.row(slot, generation))
    pool = WorkerPool("decode", (here,))
    try:
        with pool.track(here, 10, prefill_tokens=100) as lease:
            assert (there.prefill_tokens, there.decode_streams) == (100, 0)
            there.prefill_tokens += 30  # the other process's own request
            lease.prefilled()
            lease.decoding()
            assert (there.prefill_tokens, there.decode_streams) == (30, 1)
            assert (table.total(slot, PREFILL_TOKENS), table.total(slot, DECODE_STREAMS)) == (30, 1)
        assert (here.prefill_tokens, here.decode_streams) == (30, 0)
        table.reset_column(1)  # the other process died: its 30 go with it
        assert (here.prefill_tokens, here.decode_streams) == (0, 0)
    finally:
        mine.close()
        theirs.close()
