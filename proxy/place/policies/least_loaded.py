from __future__ import annotations

from collections.abc import Sequence

from proxy.control.workers import WorkerState
from proxy.place.policies.base import RequestInfo


class LeastLoaded:
    """Fewest in-flight requests; ties go to the fewest in-flight prompt characters, then to the
    first worker after the one this policy picked last (in index order, wrapping). Several
    serving processes read the same shared counts (proxy.procs.loadtable): were ties to go to the
    lowest index, every process would send its next request to the same engine at once."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._start = 0  # where the look for the least loaded begins: after the last pick

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        best: int | None = None
        best_key = (0, 0)
        count = len(workers)
        start = self._start % count if count else 0
        for offset in range(count):
            index = (start + offset) % count
            worker = workers[index]
            if not worker.available:
                continue
            key = (worker.inflight, worker.inflight_chars)
            if best is None or key < best_key:
                best, best_key = index, key
        if best is not None:
            self._start = best + 1
        return best

    def forget(self, url: str) -> None:
        return None  # nothing is kept per worker
