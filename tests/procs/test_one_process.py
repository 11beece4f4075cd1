"""The shared admission in one serving process behaves as one process's admission: the unit
scenarios of tests/serve/test_admission.py, run with SharedAdmission in Admission's place."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import tests.serve.test_admission as scenarios
from proxy.procs.admission import SharedAdmission
from proxy.procs.slots import SlotTable

SCENARIOS = [
    scenarios.test_slots_queue_and_rejection,
    scenarios.test_cancelled_waiter_leaves_the_queue_and_timeout_is_429,
    scenarios.test_unlimited_by_default,
    scenarios.test_waiters_are_served_by_priority_then_arrival,
    scenarios.test_a_full_queue_gives_a_better_priority_the_worst_waiters_place,
]


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    made: list[SharedAdmission] = []

    def admission(max_concurrent: int, max_queue: int, queue_timeout: float) -> SharedAdmission:
        table = SlotTable.create(1, max_concurrent, max_queue, queue_timeout)
        made.append(SharedAdmission(table, 0))
        return made[-1]

    monkeypatch.setattr(scenarios, "Admission", admission)
    yield
    for one in made:
        one.close()
        one.table.unlink()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_as_one_process(shared: None, scenario: Callable[[], None]) -> None:
    scenario()
