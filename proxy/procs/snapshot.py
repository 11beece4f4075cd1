"""The workers as the control process publishes them, and their mirror in a serving process.

The control process owns the workers (proxy.control.registry): membership, lifecycle, health, the
breakers as every process's outcomes move them, the engines' scraped load, KV-transfer health, the
pool's leans. `describe` turns them into one snapshot (plain JSON); `Mirror` applies a snapshot to a
serving process's own `WorkerPool`s, keeping each worker's object for its whole life there (the
requests in flight hold it), so that the data plane's policies, placements and planner run on them
unchanged.

Every worker carries its slot in the shared load table (proxy.procs.loadtable) and the slot's
generation, which the control process assigned when the worker joined. A serving process's
worker (`SharedWorker`) reads its requests in flight and their prompt characters (`inflight`,
`inflight_chars`, what the policies read) from that row, summed over every serving process, and
writes its own requests into its own column (proxy.procs.report.ReportingPool.track): a policy in
any process sees every process's picks at once.

What a serving process keeps for itself, and the snapshot never overwrites: its requests on each
worker (`own`), its `prefill_tokens` and `decode_streams` (the processes' sums are the control
process's, proxy.procs.report) and, until the control process has applied this process's last
failures (the snapshot's `ack`), its breakers: a failure it just saw opens its breaker at once
and is not undone by a snapshot taken before the control process heard of it.

A worker that leaves the snapshot leaves the mirror: no process routes to it from the next
publication on; requests of this process still on it end with an error, as they would in one
process. A worker that begins to drain gives this process's requests on it `drain_timeout`
(`on_draining`: the serving process ends those still running then, as the drain would in one
process; the control process's own drain ends none, since it runs no request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from proxy.control.workers import (
    Breaker,
    EngineLoad,
    Health,
    KvTransfer,
    Lifecycle,
    Role,
    Worker,
    WorkerPool,
)
from proxy.engines.connectors.lmcache_config import Receiver
from proxy.procs.loadtable import DECODE_STREAMS, PREFILL_TOKENS, LoadTable, Row

Item = dict[str, Any]


def _load(w: Worker) -> list[Any] | None:
    load = w.engine_load
    if load is None:
        return None
    return [load.running, load.waiting, load.kv_usage, load.prefix_caching]


def _kv(w: Worker) -> list[Any] | None:
    t = w.kv_transfer
    return None if t is None else [t.transfers, t.seconds, t.nbytes, t.window_s, t.slow]


def _receiver(w: Worker) -> list[Any] | None:
    rx = w.lmcache
    return None if rx is None else [rx.host, list(rx.init_ports), list(rx.alloc_ports)]


def describe_worker(w: Worker, slot: tuple[int, int]) -> Item:
    return {
        "id": w.id,
        "slot": slot,  # its row of the load table: (slot, generation)
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
        "lmcache": _receiver(w),  # connector lmcache: the decoder's receiver, pushed into
        # perf_counter() (one clock for the host) of its engine's last work, as scraped: the
        # serving processes' stall watches take it as progress (proxy.control.stall)
        "progress": w.last_progress,
    }


def describe(pools: Iterable[WorkerPool], slots: Mapping[Worker, tuple[int, int]]) -> list[Item]:
    """Every member (active and draining) of every pool that has a slot of the load table
    (`slots`: the control process's assignments), in each pool's order."""
    return [describe_worker(w, slots[w]) for pool in pools for w in pool.members if w in slots]


class SharedWorker(Worker):
    """A serving process's worker: `inflight` and `inflight_chars` are its row of the load table,
    summed over every serving process. This process's own requests go into its column through
    the row, and into `own`, in its pool's `track` (proxy.procs.report.ReportingPool): an
    assignment to either counter (WorkerPool.track's own `+=`) lands nowhere.

    `prefill_tokens` and `decode_streams` (what the pool places by) are the row's sums too; the
    leases change them with `+=` and `-=`, which read the sum and write it back changed: the
    write lands in this process's column as the difference from the sum just read (read and
    write are one statement, with no await between them)."""

    def __init__(self, role: Role, id: str, url: str, row: Row) -> None:
        self.row = row
        self.own = 0  # this process's requests on it
        self._read = [0, 0, 0, 0]  # the sums last read, by field
        super().__init__(role, id, url)

    @property
    def inflight(self) -> int:
        return self.row.inflight

    @inflight.setter
    def inflight(self, value: int) -> None:
        pass

    @property
    def inflight_chars(self) -> int:
        return self.row.chars

    @inflight_chars.setter
    def inflight_chars(self, value: int) -> None:
        pass

    def _total(self, field: int) -> int:
        self._read[field] = total = self.row.total(field)
        return total

    def _change(self, field: int, value: int) -> None:
        self.row.change(field, value - self._read[field])
        self._read[field] = value

    @property
    def prefill_tokens(self) -> int:
        return self._total(PREFILL_TOKENS)

    @prefill_tokens.setter
    def prefill_tokens(self, value: int) -> None:
        self._change(PREFILL_TOKENS, value)

    @property
    def decode_streams(self) -> int:
        return self._total(DECODE_STREAMS)

    @decode_streams.setter
    def decode_streams(self, value: int) -> None:
        self._change(DECODE_STREAMS, value)


class Mirror:
    """A serving process's pools, kept equal to the control process's last snapshot."""

    def __init__(
        self,
        pools: Sequence[WorkerPool],
        table: LoadTable,
        on_removed: Callable[[Worker], None],
        end_requests: Callable[[Worker], None],
        on_draining: Callable[[Worker], None] = lambda worker: None,
    ) -> None:
        self.pools = tuple(pools)
        self.table = table  # attached with this process's column
        self.known: dict[str, SharedWorker] = {}  # id -> this process's object for it
        self.on_removed = on_removed  # the data plane forgets what it kept about it
        self.end_requests = end_requests  # this process's requests still on a removed worker
        self.on_draining = on_draining  # a worker began its drain: its deadline starts here
        self.applied = 0  # snapshots applied
        self.changed_at = 0.0  # time(): when a snapshot last changed who is routed

    def apply(self, items: Sequence[Item], breakers: bool) -> None:
        """Make the pools the snapshot's `items`; `breakers`: take the snapshot's breakers too
        (the control process has applied every outcome this process sent)."""
        seen: dict[str, SharedWorker] = {}
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

    def _worker(self, item: Item, breakers: bool) -> SharedWorker:
        worker = self.known.get(item["id"])
        slot, generation = item["slot"]
        if (
            worker is None
            or worker.url != item["url"]
            or worker.role != item["role"]
            or (worker.row.slot, worker.row.generation) != (slot, generation)
        ):
            if worker is not None:
                self._remove(worker)
            row = self.table.row(slot, generation)
            worker = SharedWorker(item["role"], item["id"], item["url"], row)
        was = worker.state
        update(worker, item, breakers)
        if worker.state is Lifecycle.DRAINING and was is not Lifecycle.DRAINING:
            self.on_draining(worker)
        return worker

    def _remove(self, worker: SharedWorker) -> None:
        worker.state = Lifecycle.REMOVED
        if worker.own:
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
        # a new scrape: what every process sent since is counted from the table's sum now
        w.engine_load = EngineLoad(running, waiting, kv_usage, w.inflight, caching)
    kv = item["kv"]
    w.kv_transfer = None if kv is None else KvTransfer(*kv)
    w.prefix_caching = item["prefix_caching"]
    w.prefix_source = item["prefix_source"]
    w.lean = item["lean"]
    w.model = item["model"]
    rx = item.get("lmcache")
    if rx is None:
        w.lmcache = None
    elif _receiver(w) != rx:
        w.lmcache = Receiver(rx[0], tuple(rx[1]), tuple(rx[2]))
    w.last_progress = max(w.last_progress, float(item["progress"]))
