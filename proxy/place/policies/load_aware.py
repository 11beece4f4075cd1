from __future__ import annotations

from collections.abc import Sequence

from proxy.control.workers import WorkerState
from proxy.place.policies.base import RequestInfo


def estimated_load(worker: WorkerState, waiting_weight: float) -> float:
    """Requests on the engine now: its last scrape (waiting ones weighted) plus what the proxy
    sent or finished since; the proxy's own in-flight count when there is no scrape."""
    load = worker.engine_load
    if load is None:
        return float(worker.inflight)
    since = worker.inflight - load.inflight_at_scrape
    return max(0.0, load.running + waiting_weight * load.waiting + since)


class LoadAware:
    """Least loaded by the engines' own counts (`vllm:num_requests_running`/`_waiting`, scraped
    by proxy.scrape), which also see requests from other clients and other proxies, corrected
    by the proxy's in-flight changes since the scrape. A worker whose KV cache is at least
    `kv_high` full is chosen only when all are (a new request there would wait or preempt).
    Ties: fewer in-flight prompt characters, then the lowest index."""

    name = "load_aware"

    def __init__(self, waiting_weight: float = 2.0, kv_high: float = 0.95) -> None:
        self.waiting_weight = waiting_weight
        self.kv_high = kv_high

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        best: int | None = None
        best_key = (False, 0.0, 0)
        for index, worker in enumerate(workers):
            if not worker.available:
                continue
            load = worker.engine_load
            full = load is not None and load.kv_usage >= self.kv_high
            key = (full, estimated_load(worker, self.waiting_weight), worker.inflight_chars)
            if best is None or key < best_key:
                best, best_key = index, key
        return best

    def forget(self, url: str) -> None:
        return None  # nothing is kept per worker
