"""What the admin API does: add a worker (allow-list, probes, state file, then routing), remove
one (state file, drain, then gone), list them; and the start-up probes of configured workers.

Every change is written to the state file (when configured) before it takes effect, so the file
never names fewer workers than the proxy routes to; a write that fails refuses the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from proxy.auth import Authenticator
from proxy.config import check_worker_url
from proxy.control.admin.config import AdminConfig
from proxy.control.admin.hosts import HostAllowList, is_loopback
from proxy.control.admin.probes import ProbeFailed, Prober
from proxy.control.admin.state import StateFile
from proxy.control.identity import Address, resolve
from proxy.control.registry import EndRequests, RegistryError, WorkerRegistry
from proxy.control.workers import Lifecycle, Role, Worker
from proxy.engines.connectors.base import ConnectorClass
from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig, Receiver
from proxy.engines.connectors.registry import pool_connectors
from proxy.engines.scrape import Scraper
from proxy.errors import BadRequest, Conflict, Forbidden, NotFound, ProxyError

log = logging.getLogger("pdproxy")


class AddWorker(BaseModel):
    """The body of POST /admin/workers."""

    model_config = ConfigDict(extra="forbid")

    url: str
    role: Literal["prefill", "decode", "pool"]
    lmcache: LMCacheReceiverConfig | None = None  # connector lmcache, decoders only
    force: bool = False  # join without probes (logged)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_worker_url(value)

    @classmethod
    def parse(cls, body: Any) -> AddWorker:
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            raise BadRequest(f"{where}: {message}", param=where) from None


class Admin:
    def __init__(
        self,
        config: AdminConfig,
        registry: WorkerRegistry,
        prober: Prober,
        auth: Authenticator,
        listen_host: str,
        connector: ConnectorClass,
        drain_timeout: float,
        end_requests: EndRequests,
        state: StateFile | None = None,
        scraper: Scraper | None = None,
        allowed: HostAllowList | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.prober = prober
        self.auth = auth
        self.connector = connector
        self.drain_timeout = drain_timeout
        self.end_requests = end_requests
        self.state = state
        self.scraper = scraper
        self.allowed = allowed or HostAllowList.default(w.url for w in registry)
        self.refusal: str | None = None
        if not (is_loopback(listen_host) or auth.admin_keys or config.allow_unauthenticated):
            self.refusal = (
                f"the admin API and the console are off: the proxy listens on {listen_host} "
                "without admin keys; set auth.admin_keys_env or auth.admin_keys_file (or "
                "admin.allow_unauthenticated: true to serve them to anyone)"
            )
        self.removed: deque[Worker] = deque(maxlen=config.recent_removed)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.event_seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[str, Worker] = {}  # configured workers that failed the start-up probe
        # drains asked for through the admin API (DELETE /admin/workers), heard by the shared
        # decisions of several replicas (proxy.control.membership.shared)
        self.drain_hooks: list[Callable[[Worker], None]] = []
        self.probes = Counter(
            "pdproxy_worker_probes",
            "admission probes by role and result (passed, or the probe that failed); probe "
            "requests count nowhere else in the proxy's statistics",
            ["role", "result"],
            registry=metrics,
        )
        registry.on_removed.append(self._forget)

    # --- guard ---

    def check_served(self) -> None:
        """Raise when the admin API and the console are off (see `refusal`)."""
        if self.refusal is not None:
            raise Forbidden(self.refusal)

    def guard(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Raise unless the caller may use the admin API (and the console's data)."""
        self.check_served()
        self.auth.check_admin(headers)

    # --- reading ---

    def describe(self, worker: Worker) -> dict[str, Any]:
        return {**worker.describe(), "last_probe": worker.last_probe}

    def list(self) -> list[dict[str, Any]]:
        for pool in self.registry.pools.values():
            pool.refresh()
        return [self.describe(w) for w in self.registry]

    def find(self, key: str) -> Worker:
        worker = self.registry.find(key)
        if worker is None:
            worker = next((w for w in reversed(self.removed) if key.rstrip("/") in (w.id, w.url)),
                          None)  # fmt: skip
        if worker is None:
            raise NotFound(
                f"no worker with id or URL {key!r}; GET /admin/workers lists them",
                code="worker_not_found",
            )
        return worker

    def _event(self, event: str, worker: Worker, detail: str = "") -> None:
        self.event_seq += 1
        self.events.append(
            {
                "seq": self.event_seq,
                "at": round(time.time(), 3),
                "event": event,
                "id": worker.id,
                "role": worker.role,
                "url": worker.url,
                "detail": detail,
            }
        )

    def _forget(self, worker: Worker) -> None:
        if worker.state is Lifecycle.REMOVED and worker not in self.removed:
            self.removed.append(worker)

    # --- changes ---

    def save(self, extra: Worker | None = None, without: Worker | None = None) -> None:
        """Write the routed workers and those held for a retried probe (plus `extra`, minus
        `without`) to the state file."""
        if self.state is None:
            return
        workers = [w for pool in self.registry.pools.values() for w in pool.workers]
        workers += self._held.values()
        if extra is not None:
            workers.append(extra)
        try:
            self.state.write(w for w in workers if w is not without)
        except OSError as exc:
            raise ProxyError(
                f"cannot write the workers state file {self.state.path}: {exc.strerror}; "
                "nothing was changed"
            ) from None

    async def add(self, spec: AddWorker, pod: str | None = None) -> Worker:
        """Probe and add a worker; raise a ProxyError saying why not. `pod`: the Kubernetes pod
        a discovery source found it in; its host is the pod's address, which the API server
        named, so the allow-list (for hosts a caller of the admin API names) is not asked."""
        if pod is None and not self.allowed.allows(spec.url):
            raise Forbidden(
                f"{spec.url}: its host is not in admin.allowed_worker_hosts "
                f"({', '.join(self.allowed.entries)})",
                param="url",
            )
        receiver = self._receiver(spec)
        # one engine, one worker: compared by what the URL reaches, with nothing awaited between
        # this check and the candidate's creation (a concurrent add of the same engine sees it)
        addresses = await resolve(spec.url)
        await self._resolve_known()
        self._refuse_known(spec.role, spec.url, addresses)
        try:
            worker = self.registry.candidate(spec.role, spec.url, receiver, addresses=addresses)
        except RegistryError as exc:
            raise Conflict(str(exc), param="url", code="worker_known") from None
        worker.pod = pod
        self._event("probing", worker, f"pod {pod}" if pod else "")
        try:
            if spec.force:
                log.warning(
                    "%s worker %s (%s) added with force: admission probes skipped",
                    worker.role,
                    worker.id,
                    worker.url,
                )
            else:
                await self._probe(worker)
                await self.prober.learn_engine_ids(worker)
                self._refuse_known(worker.role, worker.url, worker.addresses, worker)
            if self.scraper is not None:  # load-aware choices see it from its first request
                await self.scraper.scrape(worker)
            self.save(extra=worker)
        except BaseException as exc:
            self.registry.discard(worker)
            self._event("refused", worker, getattr(exc, "message", type(exc).__name__))
            raise
        self.registry.activate(worker)
        self._event("joined", worker, "forced, not probed" if spec.force else "probes passed")
        return worker

    def _receiver(self, spec: AddWorker) -> Receiver | None:
        """What the connector needs of the joining worker: its receiver, for a decoder."""
        if spec.role == "pool" and not self.connector.pool_engines:
            raise BadRequest(
                f"pool engines need connector {' or '.join(pool_connectors())} (kv_both); this "
                f"proxy runs {self.connector.name}",
                param="role",
            )
        if spec.lmcache is not None and spec.role != "decode":
            raise BadRequest("'lmcache' ports belong to decode workers", param="lmcache")
        if spec.role != "decode":
            return None
        taken = [w.lmcache for w in self.registry if w.lmcache is not None]
        try:
            return self.connector.receiver_for(spec.url, spec.lmcache, taken)
        except ValueError as exc:
            raise Conflict(str(exc), param="lmcache") from None

    async def _resolve_known(self) -> None:
        """What the known workers' hosts resolve to now (a name may have moved since it joined;
        one that no longer resolves keeps what it resolved to)."""
        known = list(self.registry)
        found = await asyncio.gather(*(resolve(w.url) for w in known))
        for worker, addresses in zip(known, found, strict=True):
            worker.addresses = addresses or worker.addresses

    def _refuse_known(
        self,
        role: Role,
        url: str,
        addresses: frozenset[Address],
        candidate: Worker | None = None,
    ) -> None:
        """A 409 naming the known worker whose engine `url` reaches (address, or the NIXL engine
        id the candidate's probe saw)."""
        engine_ids = candidate.engine_ids if candidate is not None else ()
        known = self.registry.same_engine(role, url, addresses, engine_ids, exclude=candidate)
        if known is not None:
            other, why = known
            raise Conflict(
                f"{role} worker {url.rstrip('/')} is already known as {other.id} ({other.role} "
                f"worker {other.url}, {other.state.value}): {why}",
                param="url",
                code="worker_known",
            )

    async def _probe(self, worker: Worker) -> None:
        try:
            await self.prober.run(worker)
        except ProbeFailed as exc:
            self.probes.labels(worker.role, exc.check).inc()
            log.warning("%s worker %s refused: %s", worker.role, worker.url, exc.message)
            raise
        self.probes.labels(worker.role, "passed").inc()

    def remove(self, key: str, force: bool = False) -> Worker:
        """Start draining a worker; it is removed once its requests are done (202)."""
        worker = self.find(key)
        if worker.id in self._held:  # a configured worker that never passed its probe
            self.save(without=worker)
            del self._held[worker.id]
            self.registry.discard(worker)
            self._event("removed", worker, "held after a failed start-up probe")
            return worker
        if worker.state is not Lifecycle.ACTIVE:
            if worker.state is Lifecycle.PROBING:
                raise Conflict(f"worker {worker.id} is still being probed; remove it after")
            return worker  # draining or removed already: say where it is
        pool = self.registry.pools[worker.role]
        if not force and pool.workers == (worker,):
            raise Conflict(
                f"{worker.id} is the last active {worker.role} worker: removing it would refuse "
                "every request; add another first, or remove with force",
                param="force",
            )
        self.save(without=worker)
        self._event("draining", worker, f"{worker.inflight} request(s) in flight")
        self.registry.drain(worker)
        task = asyncio.create_task(self._retire(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _retire(self, worker: Worker) -> None:
        await self.registry.retire(worker, self.drain_timeout, self.end_requests)
        self._event("removed", worker)

    # --- start-up ---

    async def start(self, probe: bool, retry_every: float) -> None:
        """Probe the configured workers (health.probe_on_start): one that fails is held out of
        routing and probed again every `retry_every` seconds until it passes."""
        if not probe:
            return
        held = []
        for role in ("prefill", "decode", "pool"):
            for worker in self.registry.pools[role].workers:
                try:
                    await self._probe_configured(worker)
                except ProbeFailed as exc:
                    self.registry.hold(worker)
                    self._held[worker.id] = worker
                    self._event("held", worker, exc.message)
                    held.append(worker)
                    log.error(
                        "%s worker %s failed its start-up probe and gets no traffic until it "
                        "passes: %s",
                        worker.role,
                        worker.url,
                        exc.message,
                    )
        if held:
            task = asyncio.create_task(self._retry(retry_every))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retry(self, every: float) -> None:
        while self._held:
            await asyncio.sleep(every)
            for worker in list(self._held.values()):
                with contextlib.suppress(ProbeFailed):
                    await self._probe_configured(worker)
                    del self._held[worker.id]
                    self.registry.activate(worker)
                    self._event("joined", worker, "start-up probe passed on retry")

    async def _probe_configured(self, worker: Worker) -> None:
        """A configured worker's start-up probe, and then what its engine reported compared
        with the workers probed before it: the configured lists were checked by address at
        start-up, but two addresses of one engine (a port forward) show only in the NIXL
        engine id its probe prefill reports. Held like a failed probe: it joins once the other
        worker is gone."""
        await self._probe(worker)
        known = self.registry.same_engine(
            worker.role, worker.url, worker.addresses, worker.engine_ids, exclude=worker
        )
        if known is None:
            return
        other, why = known
        failure = ProbeFailed(
            "identity",
            f"{worker.role} worker {worker.url} is the engine of {other.id} ({other.role} worker "
            f"{other.url}): {why}",
        )
        if worker.last_probe is not None:
            worker.last_probe["passed"] = False
            worker.last_probe["checks"].append(
                {"name": "identity", "ok": False, "detail": failure.message, "seconds": 0.0}
            )
        self.probes.labels(worker.role, "identity").inc()
        raise failure

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
