from __future__ import annotations

from collections.abc import Sequence

from proxy.control.workers import WorkerState
from proxy.place.policies.base import RequestInfo


class RoundRobin:
    """Each available worker in turn; unavailable ones are skipped without losing the turn order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        count = len(workers)
        for offset in range(count):
            index = (self._next + offset) % count
            if workers[index].available:
                self._next = index + 1
                return index
        return None

    def forget(self, url: str) -> None:
        return None  # nothing is kept per worker
