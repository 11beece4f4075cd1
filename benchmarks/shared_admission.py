"""CPU of the shared admission (proxy.procs.admission) against one process's admission
(proxy.serve.admission), in the same run, in one process:

  a free slot     `async with admission.slot()` when a slot is free (the path of almost every
                  request): Admission; SharedAdmission with a limit (the lock taken twice);
                  SharedAdmission unlimited (no lock)
  a full queue    the decisions behind a full queue of 1024 waiters, under the lock: a release
                  that hands the slot to the best waiter (who takes it), and an arrival that
                  queues behind it; then an arrival that evicts the worst waiter

    python benchmarks/shared_admission.py

Prints microseconds per operation (best of several repeats).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.procs.admission import SharedAdmission
from proxy.procs.slots import SlotTable
from proxy.serve.admission import Admission

ROUNDS = 20_000
REPEAT = 5
QUEUE = 1024


async def slot_us(admission: Admission | SharedAdmission) -> float:
    best = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        for _ in range(ROUNDS):
            async with admission.slot():
                pass
        best = min(best, time.perf_counter() - start)
    return best / ROUNDS * 1e6


async def free_slot() -> None:
    limited = SlotTable.create(1, 64, QUEUE, 30)
    unlimited = SlotTable.create(1, 0, 0, 30)
    shared, free = SharedAdmission(limited, 0), SharedAdmission(unlimited, 0)
    try:
        print("a free slot, per request:")
        print(
            f"  Admission                       {await slot_us(Admission(64, QUEUE, 30)):6.2f} us"
        )
        print(f"  SharedAdmission (limit 64)      {await slot_us(shared):6.2f} us")
        print(f"  SharedAdmission (unlimited)     {await slot_us(free):6.2f} us")
    finally:
        for admission in (shared, free):
            admission.close()
            admission.table.unlink()


def full_queue() -> None:
    table = SlotTable.create(1, 8, QUEUE, 30)
    rng = random.Random(1)
    try:
        for _ in range(8 + QUEUE):
            table.arrive(0, rng.randrange(10))
        best = float("inf")
        for _ in range(REPEAT):
            start = time.perf_counter()
            for _ in range(ROUNDS // 10):
                with table.segment.locked():
                    granted = table.release(0)
                    assert granted is not None
                    table.settle(granted)
                with table.segment.locked():
                    table.arrive(0, rng.randrange(10))
            best = min(best, time.perf_counter() - start)
        print(f"a full queue of {QUEUE}: release to the best + settle, then an arrival:")
        print(f"  {best / (ROUNDS // 10) * 1e6:.1f} us (both, each under the lock)")
        start = time.perf_counter()
        for i in range(ROUNDS // 10):
            with table.segment.locked():
                table.arrive(0, -1 - i)  # better than any waiter: evicts the worst
        evicting = (time.perf_counter() - start) / (ROUNDS // 10) * 1e6
        print(f"  an arrival that evicts the worst: {evicting:.1f} us")
    finally:
        table.close()
        table.unlink()


def main() -> int:
    asyncio.run(free_slot())
    full_queue()
    return 0


if __name__ == "__main__":
    sys.exit(main())
