"""Every worker the proxy knows, by stable id, and the only code that changes who is routed.

Ids are the role's letter and a number (`p0`, `d3`, `b1` for a pool engine), given in order and
never reused by one registry once a worker was routed with it: configured workers get theirs
first, in config order; a worker added at run time gets the next one while it is probed, and
gives it back when it is refused (so refusals leave no gaps: d0, d1, d2 after two refused adds).

One engine is one worker of a role (and never both a dedicated and a pool worker): a URL that
reaches a known worker's engine, however it is spelled, is refused naming that worker (see
proxy.control.identity). The registry changes membership in three synchronous
steps, each one swap of a pool's tuples (see proxy.control.workers), so a request between two awaits
sees a worker either wholly in or wholly out:

    candidate (probing, not routed) -> activate (routed) -> drain (not routed, still serving)
    -> remove (gone; `on_removed` listeners forget it: policy state, connections, ...)

and `hold` puts an idle active worker back to candidate (one that failed a start-up probe).

`retire` runs drain -> wait for the worker's in-flight requests (at most `timeout` seconds; then
`end_requests` ends those left, as the shutdown drain does) -> remove.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from proxy.control.identity import Address, roles_clash, same_engine, url_key
from proxy.control.workers import ID_PREFIX, Lifecycle, Role, Worker, WorkerPool
from proxy.engines.connectors.lmcache_config import Receiver

log = logging.getLogger("pdproxy")

ROLES: tuple[Role, ...] = ("prefill", "decode", "pool")
EndRequests = Callable[[Iterable[asyncio.Task[Any]], str], None]


class RegistryError(ValueError):
    """A membership change that cannot be made; the message says why."""


class WorkerRegistry:
    def __init__(
        self, prefill: WorkerPool, decode: WorkerPool, pool: WorkerPool | None = None
    ) -> None:
        self.pools: dict[Role, WorkerPool] = {
            "prefill": prefill,
            "decode": decode,
            "pool": WorkerPool("pool", (), prefill.failure_threshold, prefill.cooldown)
            if pool is None
            else pool,
        }
        self.candidates: dict[str, Worker] = {}  # probing: known, not routed
        self.on_removed: list[Callable[[Worker], None]] = []
        self.on_added: list[Callable[[Worker], None]] = []  # routed from now on (after add)
        self._next = {role: 0 for role in ROLES}
        self._routed = {role: 0 for role in ROLES}  # past the highest id ever routed
        for pool in self.pools.values():
            for worker in pool.members:
                self._claim(worker.role, worker.id, routed=True)

    @classmethod
    def empty(cls, failure_threshold: int = 3, cooldown: float = 10.0) -> WorkerRegistry:
        return cls(*(WorkerPool(role, (), failure_threshold, cooldown) for role in ROLES))

    def __iter__(self) -> Iterator[Worker]:
        """Every worker the proxy knows: members of both pools, then candidates."""
        for pool in self.pools.values():
            yield from pool.members
        yield from self.candidates.values()

    def __repr__(self) -> str:
        return f"<WorkerRegistry {' '.join(repr(p) for p in self.pools.values())}>"

    def _claim(self, role: Role, worker_id: str, routed: bool = False) -> None:
        prefix, number = worker_id[:1], worker_id[1:]
        if prefix == ID_PREFIX[role] and number.isdigit():
            self._next[role] = max(self._next[role], int(number) + 1)
            if routed:
                self._routed[role] = max(self._routed[role], int(number) + 1)

    def _give_back(self, role: Role) -> None:
        """After a candidate that was never routed leaves: the next id is the one after the
        highest still in use or ever routed, so a refused add leaves no gap."""
        self._next[role] = self._routed[role]
        for worker in self:
            if worker.role == role:
                self._claim(role, worker.id)

    def same_engine(
        self,
        role: Role,
        url: str,
        addresses: frozenset[Address] = frozenset(),
        engine_ids: Iterable[str] = (),
        exclude: Worker | None = None,
    ) -> tuple[Worker, str] | None:
        """A known worker whose engine `url` reaches in a role that clashes with `role`, and why
        they are one engine; None when there is none."""
        engine_ids = tuple(engine_ids)
        for other in self:
            if other is exclude or not roles_clash(role, other.role):
                continue
            why = same_engine(
                url, other.url, addresses, other.addresses, engine_ids, other.engine_ids
            )
            if why is not None:
                return other, why
        return None

    def find(self, key: str) -> Worker | None:
        """The worker with this id, or else the one with this URL (base URL, any trailing /),
        or else one whose URL is this one spelled otherwise (`HTTP://Host:80/`)."""
        key = key.rstrip("/")
        by_url = by_spelling = None
        for worker in self:
            if worker.id == key:
                return worker
            if worker.url == key and by_url is None:
                by_url = worker
            if by_spelling is None and "://" in key and url_key(worker.url) == url_key(key):
                by_spelling = worker
        return by_url or by_spelling

    def candidate(
        self,
        role: Role,
        url: str,
        lmcache: Receiver | None = None,
        worker_id: str | None = None,
        addresses: frozenset[Address] = frozenset(),
    ) -> Worker:
        """A new worker in state `probing`: listed, never routed until `activate`. `addresses`:
        what its host resolves to (proxy.control.identity.resolve), compared with the known
        workers' to refuse a second worker for one engine."""
        url = url.rstrip("/")
        if role not in self.pools:
            raise RegistryError(f"role must be 'prefill', 'decode' or 'pool', not {role!r}")
        known = self.same_engine(role, url, addresses)
        if known is not None:
            other, why = known
            raise RegistryError(
                f"{role} worker {url} is already known as {other.id} ({other.role} worker "
                f"{other.url}, {other.state.value}): {why}"
            )
        for other in self:
            if worker_id is not None and other.id == worker_id:
                raise RegistryError(f"worker id {worker_id} is taken by {other.url}")
        if worker_id is None:
            worker_id = f"{ID_PREFIX[role]}{self._next[role]}"
        self._claim(role, worker_id)
        worker = Worker(role, worker_id, url, lmcache=lmcache, state=Lifecycle.PROBING)
        worker.addresses = addresses
        self.candidates[worker.id] = worker
        return worker

    def discard(self, worker: Worker) -> None:
        """A candidate that will not join (its probe failed)."""
        if self.candidates.pop(worker.id, None) is not None:
            worker.state = Lifecycle.REMOVED
            self._give_back(worker.role)
            self._removed(worker)

    def activate(self, worker: Worker) -> None:
        """Route to a candidate from now on."""
        if self.candidates.pop(worker.id, None) is None:
            raise RegistryError(f"worker {worker.id} is not a candidate ({worker.state.value})")
        self.pools[worker.role].add(worker)
        self._claim(worker.role, worker.id, routed=True)
        log.info("%s worker %s (%s) joined", worker.role, worker.id, worker.url)
        self._added(worker)

    def add(
        self, role: Role, url: str, lmcache: Receiver | None = None, worker_id: str | None = None
    ) -> Worker:
        """A worker routed at once, without probing (configured workers, forced additions)."""
        worker = self.candidate(role, url, lmcache, worker_id)
        del self.candidates[worker.id]
        self.pools[role].add(worker)
        self._claim(role, worker.id, routed=True)
        self._added(worker)
        return worker

    def hold(self, worker: Worker) -> None:
        """Take an active worker that has no request in flight out of routing, back to a
        candidate (a configured worker that failed its start-up probe)."""
        if worker.state is not Lifecycle.ACTIVE or worker.inflight:
            raise RegistryError(f"worker {worker.id} is {worker.state.value} with requests")
        self.pools[worker.role].remove(worker, Lifecycle.PROBING)
        self.candidates[worker.id] = worker

    def drain(self, worker: Worker) -> None:
        """No new request for `worker`; those in flight on it go on."""
        if worker.state is not Lifecycle.ACTIVE:
            raise RegistryError(f"worker {worker.id} is {worker.state.value}, not active")
        self.pools[worker.role].drain(worker)
        log.info(
            "%s worker %s (%s) draining: %d request(s) in flight",
            worker.role,
            worker.id,
            worker.url,
            worker.inflight,
        )

    def remove(self, worker: Worker) -> None:
        """Gone: from routing, health, stats and metrics; listeners forget what they kept."""
        if worker.state is Lifecycle.REMOVED:
            return
        self.pools[worker.role].remove(worker)
        self._removed(worker)
        log.info("%s worker %s (%s) removed", worker.role, worker.id, worker.url)

    def _added(self, worker: Worker) -> None:
        for listener in self.on_added:
            listener(worker)

    def _removed(self, worker: Worker) -> None:
        for listener in self.on_removed:
            listener(worker)

    async def retire(
        self, worker: Worker, timeout: float, end_requests: EndRequests, settle: float = 5.0
    ) -> None:
        """Drain `worker`, wait for its requests (at most `timeout` s), end those still running
        after that (then give them `settle` s to unwind), and remove it."""
        if worker.state is Lifecycle.ACTIVE:
            self.drain(worker)
        if not await _idle(worker, timeout):
            log.warning(
                "%s worker %s: %d request(s) still running after %gs of drain: ending them",
                worker.role,
                worker.id,
                worker.inflight,
                timeout,
            )
            end_requests(
                list(worker.tasks),
                f"{worker.role} worker {worker.url} was removed before the answer was complete",
            )
            await _idle(worker, settle)
        self.remove(worker)


async def _idle(worker: Worker, timeout: float) -> bool:
    """Whether `worker` has no request in flight within `timeout` seconds."""
    if worker.inflight:
        worker.idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await worker.idle.wait()
        except TimeoutError:
            return False
        finally:
            worker.idle = None
    return True
