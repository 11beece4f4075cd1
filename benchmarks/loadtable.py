"""CPU of the shared load table (proxy.procs.loadtable) on a request's path, against what a
worker's counters cost today (plain int attributes of one process), in the same run: one add and
one sub on this process's column (a request starts and ends on an engine), and one summed read
(a policy reads an engine's load), with 8 serving processes' columns.

    python benchmarks/loadtable.py

Prints ns per operation (best of several repeats) and the ratio to the plain attributes. One
process: what a write costs when other cores read the same cache lines is not measured here.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.procs.loadtable import LoadTable

COLUMNS = 8
SLOTS = 64
CHARS = 1200
NUMBER = 200_000
REPEAT = 7


class Plain:
    """A worker's counters as today: Worker.inflight and Worker.inflight_chars."""

    inflight = 0
    inflight_chars = 0


def ns_per_call(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=NUMBER, repeat=REPEAT)) / NUMBER * 1e9


def plain_add_sub(worker: Plain) -> None:
    worker.inflight += 1
    worker.inflight_chars += CHARS
    worker.inflight -= 1
    worker.inflight_chars -= CHARS


def main() -> int:
    control = LoadTable.create(COLUMNS, SLOTS)
    serving = LoadTable.attach(control.name, 3)
    try:
        slot, generation = control.assign()
        row = serving.row(slot, generation)
        worker = Plain()
        pairs = [
            (
                "add + sub",
                lambda: plain_add_sub(worker),
                lambda: (serving.add(slot, 1, CHARS), serving.sub(slot, 1, CHARS)),
            ),
            (
                "add + sub, via Row",
                lambda: plain_add_sub(worker),
                lambda: (row.add(1, CHARS), row.sub(1, CHARS)),
            ),
            ("summed read (inflight)", lambda: worker.inflight, lambda: serving.inflight(slot)),
            ("summed read, via Row", lambda: worker.inflight, lambda: row.inflight),
        ]
        print(f"{COLUMNS} columns (serving processes), best of {REPEAT} x {NUMBER:,} calls")
        for name, plain, shared in pairs:
            base, cost = ns_per_call(plain), ns_per_call(shared)
            ratio = cost / base
            print(f"  {name:<24} table {cost:5.0f} ns  plain ints {base:4.0f} ns  x{ratio:.1f}")
        print(f"  (an empty call, in both: {ns_per_call(lambda: None):.0f} ns)")
    finally:
        serving.close()
        control.close()
        control.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
