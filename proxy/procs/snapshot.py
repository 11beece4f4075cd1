"""The workers as the control process publishes them, and their mirror in a serving process.

The control process owns the workers (proxy.control.registry): membership, lifecycle, health,
the breakers as every process's outcomes move them, the engines' scraped load, KV-transfer
health, the pool's leans. `describe` turns them into one snapshot (plain JSON); `Mirror` applies
a snapshot to a serving process's own `WorkerPool`s, keeping each worker's object for its whole
life there (the requests in flight hold it, and its in-flight counters are this process's own),
so that the data plane's policies, placements and planner run on them unchanged.

What a serving process keeps for itself, and the snapshot never overwrites: its in-flight
counters (`inflight`, `inflight_chars`, `prefill_tokens`, `decode_streams`: its own requests;
the processes' sum is the control process's, proxy.procs.report) and, until the control process
has applied this process's last failures (the snapshot's `ack`), its breakers: a failure it just
saw opens its breaker at once and is not undone by a snapshot taken before the control process
heard of it.

A worker that leaves the snapshot leaves the mirror: no process routes to it from the next
publication on; requests of this process still on it end with an error, as they would in one
process. A worker that begins to drain gives this process's requests on it `drain_timeout`
(`on_draining`: the serving process ends those still running then, as the drain would in one
process; the control process's own drain ends none, since it runs no request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.control.workers import (
    Breaker,
    EngineLoad,
    Health,
    KvTransfer,
    Lifecycle,
    Worker,
    WorkerPool,
)

Item = dict[str, Any]


def _load(w: Worker) -> list[Any] | None:
    load = w.engine_load
    if load is None:
        return None
    return [load.running, load.waiting, load.kv_usage, load.prefix_caching]


def _kv(w: Worker) -> list[Any] | None:
    t = w.kv_transfer
    return None if t is None else [t.transfers, t.seconds, t.nbytes, t.window_s, t.slow]


def describe_worker(w: Worker) -> Item:
    return {
        "id": w.id,
        "url": w.url,
        "role": w.role,
        "state": w.state.value,
        "health": w.health.value,
        "ignored": w.health_ignored,
        "breaker": w.breaker.value,
        "opened_at": w.opened_at,  # monotonic(): one clock for every process of the host
        "failures": w.consecutive_failures,
        "last_error": w.last_error,
        "load": _load(w),
        "kv": _kv(w),
        "prefix_caching": w.prefix_caching,
        "prefix_source": w.prefix_source,
        "lean": w.lean,
        "model": w.model,
        # perf_counter() (one clock for the host) of its engine's last work, as scraped: the
        # serving processes' stall watches take it as progress (proxy.control.stall)
        "progress": w.last_progress,
    }


def describe(pools: Iterable[WorkerPool]) -> list[Item]:
    """Every member (active and draining) of every pool, in each pool's order."""
    return [describe_worker(w) for pool in pools for w in pool.members]


class Mirror:
    """A serving process's pools, kept equal to the control process's last snapshot."""

    def __init__(
        self,
        pools: Sequence[WorkerPool],
        on_removed: Callable[[Worker], None],
        end_requests: Callable[[Worker], None],
        on_draining: Callable[[Worker], None] = lambda worker: None,
    ) -> None:
        self.pools = tuple(pools)
        self.known: dict[str, Worker] = {}  # id -> this process's object for it
        self.on_removed = on_removed  # the data plane forgets what it kept about it
        self.end_requests = end_requests  # this process's requests still on a removed worker
        self.on_draining = on_draining  # a worker began its drain: its deadline starts here
        self.applied = 0  # snapshots applied
        self.changed_at = 0.0  # time(): when a snapshot last changed who is routed

    def apply(self, items: Sequence[Item], breakers: bool) -> None:
        """Make the pools the snapshot's `items`; `breakers`: take the snapshot's breakers too
        (the control process has applied every outcome this process sent)."""
        seen: dict[str, Worker] = {}
        routed = [w.id for p in self.pools for w in p.workers]
        for pool in self.pools:
            members = [self._worker(i, breakers) for i in items if i["role"] == pool.role]
            seen.update((w.id, w) for w in members)
            pool.members = tuple(members)
            pool.workers = tuple(w for w in members if w.state is Lifecycle.ACTIVE)
        for worker_id, worker in list(self.known.items()):
            if worker_id not in seen:
                self._remove(worker)
        self.known = seen
        self.applied += 1
        if routed != [w.id for p in self.pools for w in p.workers]:
            self.changed_at = time.time()

    def _worker(self, item: Item, breakers: bool) -> Worker:
        worker = self.known.get(item["id"])
        if worker is None or worker.url != item["url"] or worker.role != item["role"]:
            if worker is not None:
                self._remove(worker)
            worker = Worker(item["role"], item["id"], item["url"])
        was = worker.state
        update(worker, item, breakers)
        if worker.state is Lifecycle.DRAINING and was is not Lifecycle.DRAINING:
            self.on_draining(worker)
        return worker

    def _remove(self, worker: Worker) -> None:
        worker.state = Lifecycle.REMOVED
        if worker.inflight:
            self.end_requests(worker)
        self.on_removed(worker)


def update(w: Worker, item: Item, breakers: bool) -> None:
    """Take the control process's view of `w`, all but this process's own counters."""
    w.state = Lifecycle(item["state"])
    w.health = Health(item["health"])
    w.health_ignored = bool(item["ignored"])
    if breakers:
        w.breaker = Breaker(item["breaker"])
        w.opened_at = float(item["opened_at"])
        w.consecutive_failures = int(item["failures"])
        w.last_error = item["last_error"]
    load = item["load"]
    if load is None:
        w.engine_load = None
    elif _load(w) != load:
        running, waiting, kv_usage, caching = load
        # a new scrape: what this process sent since is its own in-flight count from now
        w.engine_load = EngineLoad(running, waiting, kv_usage, w.inflight, caching)
    kv = item["kv"]
    w.kv_transfer = None if kv is None else KvTransfer(*kv)
    w.prefix_caching = item["prefix_caching"]
    w.prefix_source = item["prefix_source"]
    w.lean = item["lean"]
    w.model = item["model"]
    w.last_progress = max(w.last_progress, float(item["progress"]))
