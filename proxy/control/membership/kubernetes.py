"""The `kubernetes` membership source: engine pods found by label, proven before they serve.

One watch per role (`discovery.selectors`), in one namespace, through lightkube: a small async
client on httpx with typed models of the core API, which is all this needs (kubernetes_asyncio
carries the whole generated API and aiohttp; kr8s wraps the same calls with more machinery).

Each watch lists the pods (reconciling the known ones against the list) and then watches from
the list's resourceVersion. For a pod:

    Ready (proxy.control.membership.pods)  -> the admin service's add: the admission probes, then
                                              routed; probes that fail are counted by reason and
                                              run again after a doubling wait, never routed before
    not Ready, terminating, deleted, or    -> the admin service's remove: drained (no new request,
    gone from a fresh list                    those in flight finish), then removed

A watch that expires (410 Gone) lists again at once; known pods absent from the new list are
drained, the others keep their workers. An API server that cannot be reached leaves the workers
as they are (log line, `pdproxy_discovery_watching` 0) and is asked again after a doubling wait.
A worker removed through the admin API stays out until its pod is replaced (or turns Ready again
after it was not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig, operators
from lightkube.core.exceptions import ApiError
from lightkube.models.core_v1 import Pod as PodModel
from lightkube.resources.core_v1 import Pod
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from proxy.config import ConfigError
from proxy.control.admin.probes import ProbeFailed
from proxy.control.admin.service import AddWorker, Admin
from proxy.control.membership.config import DiscoveryConfig
from proxy.control.membership.leader import LeaderElector, identity
from proxy.control.membership.peers import PeerLoad
from proxy.control.membership.pods import PodView, view
from proxy.control.membership.selectors import parse_selector
from proxy.control.membership.shared import SharedDecisions
from proxy.control.pool import PoolController
from proxy.control.workers import Lifecycle, Role, Worker
from proxy.errors import ProxyError

log = logging.getLogger("pdproxy")

STATES = ("seen", "probing", "serving")


@dataclass(eq=False)
class Tracked:
    """A pod the watch knows, and what discovery did with it."""

    view: PodView
    worker: Worker | None = None  # joined (routed, or draining after it left)
    joining: asyncio.Task[None] | None = None  # probing, or waiting to probe again
    ready_at: float = field(default_factory=time.monotonic)


def lightkube_selector(text: str) -> dict[str, Any]:
    """A selector as lightkube's list and watch take it."""
    out: dict[str, Any] = {}
    for key, (op, value) in parse_selector(text).items():
        if op == "exists":
            out[key] = operators.exists()
        elif op == "!exists":
            out[key] = operators.not_exists()
        else:
            out[key] = operators.equal(value) if op == "=" else operators.not_equal(value)
    return out


def replicas(
    config: DiscoveryConfig,
    admin: Admin,
    metrics: CollectorRegistry | None,
    pool: PoolController | None,
) -> tuple[LeaderElector | None, SharedDecisions | None]:
    """With discovery.leader: the Lease's elector and the shared decisions; else neither."""
    if config.leader is None:
        return None, None
    elector = LeaderElector(config.leader, identity(config.leader), metrics)
    return elector, SharedDecisions(config.leader, elector, admin, pool)


def peer_load(
    config: DiscoveryConfig,
    elector: LeaderElector | None,
    pool: PoolController | None,
    metrics: CollectorRegistry | None,
) -> PeerLoad | None:
    """With leader.peers and a pool: the other replicas' prompt load, for the leader."""
    if elector is None or pool is None or config.leader is None or not config.leader.peers:
        return None
    return PeerLoad(config, lightkube_selector(config.leader.peers), elector, pool, metrics)


class KubernetesSource:
    def __init__(
        self,
        config: DiscoveryConfig,
        admin: Admin,
        metrics: CollectorRegistry | None = None,
        pool: PoolController | None = None,
    ) -> None:
        self.config = config
        self.admin = admin
        # several replicas: the Lease, and the decisions its holder makes for all
        self.elector, self.shared = replicas(config, admin, metrics, pool)
        self.peers = peer_load(config, self.elector, pool, metrics)
        sel = config.selectors
        chosen: tuple[tuple[Role, str | None], ...] = (
            ("prefill", sel.prefill),
            ("decode", sel.decode),
            ("pool", sel.pool),
        )
        self.selectors = {role: lightkube_selector(text) for role, text in chosen if text}
        self.pods: dict[str, Tracked] = {}  # by role/uid
        self.client: AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected: dict[Role, bool] = {}
        self.counts = Gauge(
            "pdproxy_discovery_pods",
            "pods the kubernetes source knows, by role and state: seen (every pod its selector "
            "names), probing (Ready, proving itself or waiting to probe again), serving (routed)",
            ["role", "state"],
            registry=metrics,
        )
        self.drained = Counter(
            "pdproxy_discovery_drained",
            "discovered workers drained because their pod was deleted, terminating or not Ready",
            ["role"],
            registry=metrics,
        )
        self.failures = Counter(
            "pdproxy_discovery_probe_failures",
            "admission probes of discovered pods that failed, by role and reason (the probe)",
            ["role", "reason"],
            registry=metrics,
        )
        self.restarts = Counter(
            "pdproxy_discovery_watch_restarts",
            "pod watches started again, by role and reason: expired (410 Gone: listed again), "
            "error (the API server could not be reached or refused)",
            ["role", "reason"],
            registry=metrics,
        )
        self.watching = Gauge(
            "pdproxy_discovery_watching",
            "1 while the role's pod watch is connected; 0 while the API server cannot be reached "
            "(the known workers keep serving)",
            ["role"],
            registry=metrics,
        )
        for role in self.selectors:
            for state in STATES:
                self.counts.labels(role, state)

    # --- running ---

    async def start(self) -> None:
        try:
            config = (
                KubeConfig.from_file(self.config.kubeconfig)
                if self.config.kubeconfig
                else KubeConfig.from_env()
            )
        except Exception as exc:  # lightkube's own error types, or the file's
            where = self.config.kubeconfig or "the in-cluster service account or KUBECONFIG"
            message = f"discovery: cannot load a Kubernetes config from {where}: {exc}"
            raise ConfigError(message) from None
        self.client = AsyncClient(config, namespace=self.config.namespace)
        # its HTTP library logs every request at INFO: the renewals and reads would flood the log
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        for role, selector in self.selectors.items():
            log.info(
                "discovering %s workers: pods in namespace %s with labels %s",
                role,
                self.client.namespace,
                getattr(self.config.selectors, role),
            )
            self._tasks.append(asyncio.create_task(self._run(role, selector)))
        if self.elector is not None and self.shared is not None:
            self.elector.client = self.shared.client = self.client
            log.info("contending for Lease %s as %s", self.elector.config.lease_name,
                     self.elector.identity)  # fmt: skip
            self._tasks.append(asyncio.create_task(self.elector.run()))
            self._tasks.append(asyncio.create_task(self.shared.run()))
        if self.peers is not None:
            self.peers.client = self.client
            self._tasks.append(asyncio.create_task(self.peers.run()))

    async def close(self) -> None:
        tasks = [*self._tasks, *(t.joining for t in self.pods.values() if t.joining)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self.shared is not None:
            await self.shared.close()
        if self.elector is not None:
            await self.elector.release()
        if self.client is not None:
            await self.client.close()

    async def _run(self, role: Role, selector: dict[str, Any]) -> None:
        """List, then watch from the list's version; again at once after a 410, after a
        doubling wait when the API server cannot be reached."""
        wait = self.config.api_retry
        while True:
            try:
                await self._watch(role, selector)
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("the %s pod watch expired (410 Gone): listing again", role)
                    self.restarts.labels(role, "expired").inc()
                    continue
                self._unreachable(role, f"{exc.status.code} {exc.status.message}", wait)
            except (httpx2.HTTPError, OSError) as exc:
                self._unreachable(role, f"{type(exc).__name__}: {exc}", wait)
            except Exception as exc:  # an answer it cannot read: the workers stay, it retries
                log.exception("the %s pod watch failed", role)
                self._unreachable(role, f"{type(exc).__name__}: {exc}", wait)
            else:
                continue  # the stream ended cleanly: list again
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.config.api_retry_max)

    async def _watch(self, role: Role, selector: dict[str, Any]) -> None:
        assert self.client is not None
        listed = self.client.list(Pod, labels=selector)
        pods = [pod async for pod in listed]
        self._reconcile(role, pods)
        if not self._connected.get(role):
            self._connected[role] = True
            log.info("the %s pod watch is connected: %d pod(s) listed", role, len(pods))
        self.watching.labels(role).set(1)
        watch = self.client.watch(
            Pod,
            labels=selector,
            resource_version=listed.resourceVersion,
            server_timeout=self.config.watch_timeout,
        )
        async for kind, pod in watch:
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._seen(role, pod, deleted=kind == "DELETED")

    def _unreachable(self, role: Role, why: str, wait: float) -> None:
        self.restarts.labels(role, "error").inc()
        self.watching.labels(role).set(0)
        self._connected[role] = False
        known = sum(1 for t in self.pods.values() if t.view.role == role and t.worker)
        log.warning(
            "cannot watch the %s pods (%s): the %d known %s worker(s) keep serving; asking the "
            "API server again in %gs",
            role,
            why,
            known,
            role,
            wait,
        )

    # --- pods ---

    def _reconcile(self, role: Role, pods: Sequence[PodModel]) -> None:
        """A fresh list: every pod as an event, and those known but no longer listed deleted."""
        listed = set()
        for pod in pods:
            listed.add(self._seen(role, pod))
        for key, tracked in list(self.pods.items()):
            if tracked.view.role == role and key not in listed:
                self._leave(tracked, "gone from the list")
                del self.pods[key]
        self._count()

    def _seen(self, role: Role, pod: PodModel, deleted: bool = False) -> str:
        c = self.config
        seen = view(
            pod, role, c.port_name, c.port_annotation, c.side_channel_annotation,
            c.lmcache_annotation,
        )  # fmt: skip
        key = f"{role}/{seen.uid}"  # a pod two selectors name is two candidates
        tracked = self.pods.get(key)
        if tracked is None:
            tracked = self.pods[key] = Tracked(seen)
        elif seen.serves and not tracked.view.serves:
            tracked.ready_at = time.monotonic()
        tracked.view = seen
        moved = tracked.worker is not None and tracked.worker.url != seen.url
        if moved and seen.serves:  # its port annotation changed: the old address goes
            self._leave(tracked, f"moved to {seen.url}")
        if deleted or not seen.serves:
            self._leave(tracked, "deleted" if deleted else seen.state)
            if deleted:
                del self.pods[key]
        elif tracked.worker is None and tracked.joining is None:
            tracked.ready_at = time.monotonic()
            tracked.joining = asyncio.create_task(self._join(tracked))
        self._count()
        return key

    def _leave(self, tracked: Tracked, why: str) -> None:
        if tracked.joining is not None:
            tracked.joining.cancel()  # the admin service discards the candidate
            tracked.joining = None
        worker, tracked.worker = tracked.worker, None
        if worker is not None and self.shared is not None:  # a drain asked of it ends as it goes
            self.shared.forget_drain(tracked.view.name)
        if worker is None or worker.state is not Lifecycle.ACTIVE:
            return
        log.info("pod %s is %s: draining %s worker %s", tracked.view.name, why, worker.role,
                 worker.id)  # fmt: skip
        try:
            self.admin.remove(worker.id, force=True)
        except ProxyError as exc:
            log.error("pod %s: cannot drain worker %s: %s", tracked.view.name, worker.id,
                      exc.message)  # fmt: skip
            return
        self.drained.labels(worker.role).inc()

    async def _join(self, tracked: Tracked) -> None:
        """Probe until it passes (or the pod stops serving, which cancels this)."""
        wait = self.config.probe_retry
        while True:
            pod = tracked.view
            try:
                spec = AddWorker(url=pod.url, role=pod.role, lmcache=pod.lmcache)
                worker = await self.admin.add(spec, pod=pod.name)
            except ProbeFailed as exc:
                reason, message = exc.check, exc.message
            except ProxyError as exc:
                reason, message = exc.code or "refused", exc.message
            except ValidationError as exc:
                reason, message = "spec", str(exc.errors()[0]["msg"])
            else:
                tracked.worker, tracked.joining = worker, None
                log.info(
                    "pod %s serves as %s worker %s (%s), %.2fs after it turned Ready; NIXL "
                    "side channel %s",
                    pod.name,
                    worker.role,
                    worker.id,
                    worker.url,
                    time.monotonic() - tracked.ready_at,
                    pod.side_channel_port or "not annotated",
                )
                self._count()
                return
            self.failures.labels(pod.role, reason).inc()
            log.warning("pod %s gets no traffic: %s; probed again in %gs", pod.name, message, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, self.config.probe_retry_max)

    def _count(self) -> None:
        for role in self.selectors:
            mine = [t for t in self.pods.values() if t.view.role == role]
            self.counts.labels(role, "seen").set(len(mine))
            self.counts.labels(role, "probing").set(sum(1 for t in mine if t.joining))
            serving = [t for t in mine if t.worker and t.worker.state is Lifecycle.ACTIVE]
            self.counts.labels(role, "serving").set(len(serving))
