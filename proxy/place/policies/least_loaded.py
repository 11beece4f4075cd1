from __future__ import annotations

from collections.abc import Sequence

from proxy.control.workers import WorkerState
from proxy.place.policies.base import RequestInfo


class LeastLoaded:
    """Fewest in-flight requests; ties go to the fewest in-flight prompt characters, then the
    lowest index (so the choice is deterministic for a given snapshot)."""

    name = "least_loaded"

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        best: int | None = None
        best_key = (0, 0)
        for index, worker in enumerate(workers):
            if not worker.available:
                continue
            key = (worker.inflight, worker.inflight_chars)
            if best is None or key < best_key:
                best, best_key = index, key
        return best

    def forget(self, url: str) -> None:
        return None  # nothing is kept per worker
