"""Workers (engine instances) and their live state, as the proxy sees it.

The pool owns the counters and the health state; policies only read them. Every increment has its
decrement in a `finally` (see `WorkerPool.track`), so counters return to zero on every path.

A worker is *available* when its last active health check did not fail and its circuit breaker
lets traffic through. When the health checks fail for every worker of a role whose breaker would
let traffic through, the checks are ignored for that role (panic routing): a check is a guess
about the engine, and refusing everything on a guess is worse than trying; breakers, which count
real request failures, still apply.

The breaker opens after `failure_threshold` consecutive failed requests, stays open for `cooldown`
seconds, then lets one trial request through (half-open): success closes it, failure opens it
again.

Membership changes at run time (proxy.control.registry) replace a pool's tuples whole: `workers`
(what the policies choose from: the active workers) and `members` (every worker still serving,
draining ones included: what health checks, scrapes, /health, /stats and /metrics see). A choice
reads one snapshot between two awaits, so a request never sees a half-added or half-removed
worker; a request holding a worker that leaves keeps its object, and its `track` still ends on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from time import monotonic
from typing import Any, Literal, Protocol

from proxy.control.waits import Wait
from proxy.engines.connectors.lmcache_config import Receiver

# A pool engine (vLLM kv_role kv_both) prefills for others and decodes, request by request, as
# the planner decides (proxy.place.pooled); its ids are b0, b1, ... (b for kv_both)
Role = Literal["prefill", "decode", "pool"]
Lean = Literal["prefill", "decode"]
ID_PREFIX: dict[Role, str] = {"prefill": "p", "decode": "d", "pool": "b"}


class Health(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Lifecycle(StrEnum):
    """Where a worker is in its membership: `probing` (checked before it may join, not routed),
    `active` (routed), `draining` (no new requests; those in flight finish), `removed` (gone)."""

    PROBING = "probing"
    ACTIVE = "active"
    DRAINING = "draining"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's own view of its load, from its /metrics (see proxy.engines.scrape).

    `inflight_at_scrape` is the proxy's in-flight count on the worker when the scrape was taken,
    so that a policy can add what the proxy sent since: `running + waiting + (inflight -
    inflight_at_scrape)` estimates the engine's load now.
    """

    running: float
    waiting: float
    kv_usage: float
    inflight_at_scrape: int
    # vllm:cache_config_info's enable_prefix_caching; None where the engine does not say
    prefix_caching: bool | None = None


@dataclass(slots=True)
class KvTransfer:
    """A decoder's recent KV transfers, from its own NIXL metrics (see proxy.control.kvhealth)."""

    transfers: int
    seconds: float  # spent in those transfers
    nbytes: float
    window_s: float  # seconds between the two scrapes compared
    slow: bool = False  # under kv_health.min_bandwidth

    @property
    def bandwidth(self) -> float:
        """Bytes per second of transfer."""
        return self.nbytes / self.seconds

    @property
    def seconds_per_transfer(self) -> float:
        return self.seconds / self.transfers

    @property
    def bytes_per_transfer(self) -> float:
        return self.nbytes / self.transfers

    def describe(self) -> dict[str, object]:
        return {
            "transfers": self.transfers,
            "bandwidth_bytes_per_second": round(self.bandwidth),
            "seconds_per_transfer": round(self.seconds_per_transfer, 6),
            "bytes_per_transfer": round(self.bytes_per_transfer),
            "window_seconds": round(self.window_s, 1),
            "slow": self.slow,
        }


class WorkerState(Protocol):
    """What a policy may read about a worker."""

    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def inflight_chars(self) -> int: ...
    @property
    def available(self) -> bool: ...
    @property
    def engine_load(self) -> EngineLoad | None: ...


@dataclass(eq=False)
class Worker:
    role: Role
    id: str  # stable for the worker's life (and across restarts through the state file)
    url: str
    lmcache: Receiver | None = None  # connector lmcache: this decoder's receiver
    state: Lifecycle = Lifecycle.ACTIVE
    inflight: int = 0
    inflight_chars: int = 0
    health: Health = Health.UNKNOWN
    breaker: Breaker = Breaker.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False
    health_ignored: bool = False  # panic routing: see WorkerPool.refresh
    last_error: str | None = None
    requests_total: int = 0
    failures_total: int = 0
    engine_load: EngineLoad | None = None  # the last good /metrics scrape; None if none or failed
    kv_transfer: KvTransfer | None = None  # recent KV pulls (decoders; see proxy.control.kvhealth)
    # whether it keeps a prefix cache, as its metrics last said (kept across failed scrapes)
    prefix_caching: bool | None = None
    # which prefix index answers for it: "events" (its KV-cache events, proxy.control.kvevents,
    # connected) or "estimate" (proxy.place.prefix)
    prefix_source: str = "estimate"
    lean: Lean | None = None  # pool engines: the side the pool's controller leans it to now
    prefill_tokens: int = 0  # prompt tokens the proxy sent it to compute, not computed yet
    decode_streams: int = 0  # answers (decode legs) the proxy has it generating now
    model: str | None = None  # what its /v1/models serves, once asked (admission probes)
    # what it is (proxy.control.identity): what its host resolved to when it joined, and the NIXL
    # engine ids its prefills reported (one per data-parallel rank behind its URL)
    addresses: frozenset[tuple[str, int]] = frozenset()
    engine_ids: set[str] = field(default_factory=set)
    last_probe: dict[str, Any] | None = None  # the result of its last admission probe
    pod: str | None = None  # the Kubernetes pod it runs in, when discovered (namespace/name)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)  # requests on it now
    waiting: set[Wait] = field(default_factory=set, repr=False)  # legs it has yet to complete
    last_progress: float = 0.0  # perf_counter() of its last completed leg or streamed bytes
    engine_work: float | None = None  # its engine's token counters at the last scrape
    stalls_total: int = 0  # times the stall watch took it out of rotation
    idle: asyncio.Event | None = field(default=None, repr=False)  # set when a drain finds 0 left

    @property
    def caches_prefixes(self) -> bool:
        """vLLM's default (on) unless the engine's metrics said otherwise."""
        return self.prefix_caching is not False

    @property
    def breaker_allows(self) -> bool:
        if self.breaker is Breaker.CLOSED:
            return True
        return self.breaker is Breaker.HALF_OPEN and not self.trial_in_flight

    @property
    def available(self) -> bool:
        if self.health is Health.UNHEALTHY and not self.health_ignored:
            return False
        return self.breaker_allows

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "url": self.url,
            "role": self.role,
            "state": self.state.value,
            "health": self.health.value,
            "breaker": self.breaker.value,
            "available": self.available,
            "prefix_source": self.prefix_source,
            "health_ignored": self.health_ignored,
            "inflight": self.inflight,
            "inflight_chars": self.inflight_chars,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "model": self.model,
            "engine_ids": sorted(self.engine_ids),
            "pod": self.pod,
            "engine_load": None
            if self.engine_load is None
            else {
                "running": self.engine_load.running,
                "waiting": self.engine_load.waiting,
                "kv_usage": self.engine_load.kv_usage,
            },
            "kv_transfer": None if self.kv_transfer is None else self.kv_transfer.describe(),
            "prefix_caching": self.prefix_caching,
            "lean": self.lean,
            "prefill_tokens": self.prefill_tokens,
            "decode_streams": self.decode_streams,
            "waiting_legs": len(self.waiting),
            "stalls_total": self.stalls_total,
        }


class Lease:
    """One tracked request on a worker (see WorkerPool.track)."""

    __slots__ = ("_decoding", "_tokens", "worker")

    def __init__(self, worker: Worker, prefill_tokens: int) -> None:
        self.worker = worker
        self._tokens = prefill_tokens
        self._decoding = False

    def prefilled(self) -> None:
        """The prompt is computed (its first token came): its tokens wait no more. Idempotent."""
        if self._tokens:  # a serving process's worker reads and writes shared memory for it
            self.worker.prefill_tokens -= self._tokens
            self._tokens = 0

    def wait(self) -> Wait:
        """The context of a leg that waits for the worker to complete something (see
        proxy.control.waits): what the stall watch looks at, and ends if the worker stalls."""
        return Wait(self.worker)

    def decoding(self) -> None:
        """The request's decode leg starts on the worker: one of its decode streams until the
        lease ends. Not before: a request still waiting for its prompt on another engine
        generates nothing here yet. Idempotent."""
        if not self._decoding:
            self._decoding = True
            self.worker.decode_streams += 1

    def _end(self) -> None:
        self.prefilled()
        if self._decoding:
            self._decoding = False
            self.worker.decode_streams -= 1


@dataclass(eq=False)
class WorkerPool:
    role: Role
    workers: tuple[Worker, ...] = ()  # routed: the active workers
    failure_threshold: int = 3
    cooldown: float = 10.0
    members: tuple[Worker, ...] = ()  # still serving: active and draining

    def __post_init__(self) -> None:
        if not self.members:
            self.members = self.workers

    @classmethod
    def from_urls(
        cls, role: Role, urls: Sequence[str], failure_threshold: int = 3, cooldown: float = 10.0
    ) -> WorkerPool:
        prefix = ID_PREFIX[role]
        workers = tuple(Worker(role, f"{prefix}{i}", url) for i, url in enumerate(urls))
        return cls(role, workers, failure_threshold, cooldown)

    def add(self, worker: Worker) -> None:
        """Route to `worker` from now on (it starts with the role's panic setting)."""
        worker.state = Lifecycle.ACTIVE
        worker.health_ignored = self.panic
        self.members = (*self.members, worker)
        self.workers = (*self.workers, worker)

    def drain(self, worker: Worker) -> None:
        """No new request goes to `worker`; those in flight on it go on."""
        worker.state = Lifecycle.DRAINING
        worker.health_ignored = False
        self.workers = tuple(w for w in self.workers if w is not worker)

    def remove(self, worker: Worker, state: Lifecycle = Lifecycle.REMOVED) -> None:
        """`worker` is gone: from routing and from what health, stats and metrics see."""
        worker.state = state
        self.workers = tuple(w for w in self.workers if w is not worker)
        self.members = tuple(w for w in self.members if w is not worker)

    def refresh(self, now: float | None = None) -> None:
        """Move open breakers whose cool-down has passed to half-open, and switch panic routing
        on or off for the role."""
        now = monotonic() if now is None else now
        for w in self.workers:
            if w.breaker is Breaker.OPEN and now - w.opened_at >= self.cooldown:
                w.breaker = Breaker.HALF_OPEN
                w.trial_in_flight = False
        panic = not any(w.health is not Health.UNHEALTHY and w.breaker_allows for w in self.workers)
        if self.workers and panic != self.workers[0].health_ignored:
            for w in self.workers:
                w.health_ignored = panic

    @property
    def panic(self) -> bool:
        return bool(self.workers) and self.workers[0].health_ignored

    @contextmanager
    def track(
        self,
        worker: Worker,
        chars: int,
        prefill_tokens: int = 0,
        owner: asyncio.Task[Any] | None = None,
    ) -> Iterator[Lease]:
        """Count one in-flight request of `chars` prompt characters on `worker` while inside,
        and note `owner`, the client's request task, on it (a drain that runs out of time ends
        those; a fanned-out request's parts all name their request's task). With
        `prefill_tokens`, that many prompt tokens wait to be computed on it until
        `Lease.prefilled` (or the end); from `Lease.decoding` on, it is one of the worker's
        decode streams."""
        lease = Lease(worker, prefill_tokens)
        worker.inflight += 1
        worker.inflight_chars += chars
        if prefill_tokens:
            worker.prefill_tokens += prefill_tokens
        worker.requests_total += 1
        task = owner
        if task is not None:
            worker.tasks.add(task)
        trial = worker.breaker is Breaker.HALF_OPEN
        if trial:
            worker.trial_in_flight = True
        try:
            yield lease
        finally:
            lease._end()
            worker.inflight -= 1
            worker.inflight_chars -= chars
            if task is not None:
                worker.tasks.discard(task)
            if trial:
                worker.trial_in_flight = False
            if not worker.inflight and worker.idle is not None:
                worker.idle.set()

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.breaker = Breaker.CLOSED

    def record_failure(self, worker: Worker, reason: str, now: float | None = None) -> None:
        """A request to `worker` failed through the worker's fault (not a client 4xx)."""
        worker.failures_total += 1
        worker.consecutive_failures += 1
        worker.last_error = reason
        if (
            worker.breaker is Breaker.HALF_OPEN
            or worker.consecutive_failures >= self.failure_threshold
        ):
            worker.breaker = Breaker.OPEN
            worker.opened_at = monotonic() if now is None else now

    def trip(self, worker: Worker, reason: str, now: float | None = None) -> None:
        """Open `worker`'s breaker now, whatever its failure count (the stall watch's verdict);
        it comes back only through a trial request, after `cooldown`."""
        worker.last_error = reason
        worker.stalls_total += 1
        worker.breaker = Breaker.OPEN
        worker.opened_at = monotonic() if now is None else now

    def record_check(self, worker: Worker, healthy: bool, reason: str | None = None) -> None:
        """The result of an active health check."""
        worker.health = Health.HEALTHY if healthy else Health.UNHEALTHY
        if not healthy:
            worker.last_error = reason

    def __repr__(self) -> str:
        loads = ", ".join(
            f"{w.id}={w.url}:{w.inflight}:{w.breaker.value}:{w.state.value}" for w in self.members
        )
        return f"<WorkerPool {self.role} [{loads}]>"
