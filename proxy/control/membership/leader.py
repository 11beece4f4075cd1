"""Leader election among proxy replicas: one `coordination.k8s.io/v1` Lease, one holder.

Every `renew_interval` each replica reads the Lease:

    absent                        -> create it naming itself (a 409: another was first)
    held by this replica          -> renew: renewTime now, replaced at the version read
    held by another, renewed      -> follow
    held by another that has not  -> take it: holderIdentity this replica, leaseTransitions + 1,
      renewed for leaseDuration      replaced at the version read (a 409: another took it first)
    released (no holder)          -> take it likewise

Whether a holder has stopped renewing is judged by this replica's own clock, from when it last
saw the Lease's resourceVersion change (as client-go does), so that replicas need not agree on
the time. Every write carries the resourceVersion it read: of two replicas that both try, the
API server accepts one and answers the other 409 Conflict. A holder that cannot renew for
`lease_duration` (the API server unreachable) steps down on its own, before another can take
the Lease; a holder that stops cleanly releases it, so that another takes it at its next read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.control.membership.config import LeaderConfig

log = logging.getLogger("pdproxy")


def identity(config: LeaderConfig) -> str:
    """This replica's name in the Lease: configured, else its pod's (the downward API's
    POD_NAME), else the host's (a pod's host name is its name)."""
    return config.identity or os.environ.get("POD_NAME") or socket.gethostname()


class LeaderElector:
    def __init__(
        self,
        config: LeaderConfig,
        identity: str,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client: AsyncClient | None = None  # the discovery's, once it has started
        self.config = config
        self.identity = identity
        self.clock = clock
        self.holder: str | None = None  # who holds the Lease, as last read
        self.leading = False
        self._renewed = -math.inf  # when this replica last renewed it
        self._version: str | None = None  # the Lease's resourceVersion last seen...
        self._version_at = clock()  # ...and when it was first seen
        self._known = False  # a holder was seen before (the first sighting is no change)
        self.is_leader = Gauge(
            "pdproxy_discovery_is_leader",
            "1 while this replica holds the Lease and decides the pool's leans, pins and drains",
            registry=metrics,
        )
        self.leader = Gauge(
            "pdproxy_discovery_leader",
            "1 for the replica this one last saw holding the Lease",
            ["identity"],
            registry=metrics,
        )
        self.changes = Counter(
            "pdproxy_discovery_leader_changes",
            "times this replica saw the Lease change hands (taken over or released)",
            registry=metrics,
        )

    async def run(self) -> None:
        """Contend for the Lease every renew_interval (cancel the task to stop)."""
        while True:
            try:
                await self.step()
            except (ApiError, httpx2.HTTPError, OSError) as exc:
                self._failed(exc)
            await asyncio.sleep(self.config.renew_interval)

    async def step(self) -> None:
        """One read of the Lease, and the write it calls for."""
        assert self.client is not None
        name = self.config.lease_name
        try:
            lease = await self.client.get(Lease, name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            await self._write(self._new_lease(), create=True)
            return
        version = lease.metadata.resourceVersion if lease.metadata else None
        now = self.clock()
        if version != self._version:
            self._version, self._version_at = version, now
        spec = lease.spec or LeaseSpec()
        duration = spec.leaseDurationSeconds or math.ceil(self.config.lease_duration)
        holder = spec.holderIdentity
        expired = now - self._version_at > duration
        if holder == self.identity or not holder or expired:
            taking = holder != self.identity
            stamp = datetime.now(UTC)
            spec.holderIdentity = self.identity
            spec.renewTime = stamp
            spec.leaseDurationSeconds = math.ceil(self.config.lease_duration)
            if taking:
                spec.acquireTime = stamp
                spec.leaseTransitions = (spec.leaseTransitions or 0) + 1
            lease.spec = spec
            await self._write(lease, create=False)
        else:
            self._set(holder, leading=False)

    def _new_lease(self) -> Lease:
        stamp = datetime.now(UTC)
        return Lease(
            metadata=ObjectMeta(name=self.config.lease_name),
            spec=LeaseSpec(
                holderIdentity=self.identity,
                leaseDurationSeconds=math.ceil(self.config.lease_duration),
                acquireTime=stamp,
                renewTime=stamp,
                leaseTransitions=0,
            ),
        )

    async def _write(self, lease: Lease, create: bool) -> None:
        assert self.client is not None
        try:
            written = await (self.client.create(lease) if create else self.client.replace(lease))
        except ApiError as exc:
            if exc.status.code != 409:  # 409: another replica wrote first; read again
                raise
            log.info("leader: another replica wrote the Lease first (409); reading it again")
            self._set(self.holder if self.holder != self.identity else None, leading=False)
            return
        self._version = written.metadata.resourceVersion if written.metadata else None
        self._version_at = self._renewed = self.clock()
        self._set(self.identity, leading=True)

    def _failed(self, exc: BaseException) -> None:
        what = (
            f"{exc.status.code} {exc.status.message}"
            if isinstance(exc, ApiError)
            else f"{type(exc).__name__}: {exc}"
        )
        if self.leading and self.clock() - self._renewed > self.config.lease_duration:
            log.warning("leader: cannot renew the Lease for %gs (%s): stepping down",
                        self.config.lease_duration, what)  # fmt: skip
            self._set(None, leading=False)
        else:
            log.warning("leader: cannot read or write the Lease (%s)", what)

    def _set(self, holder: str | None, leading: bool) -> None:
        if holder != self.holder:
            if self.holder is not None:
                self.leader.remove(self.holder)
            if holder is not None:
                self.leader.labels(holder).set(1)
            log.info("leader: %s now holds Lease %s%s", holder or "no replica",
                     self.config.lease_name, " (this replica)" if leading else "")  # fmt: skip
            if self._known:
                self.changes.inc()
            self._known = self._known or holder is not None
            self.holder = holder
        self.leading = leading
        self.is_leader.set(1 if leading else 0)

    async def release(self) -> None:
        """Stopping cleanly: give the Lease up so that another replica takes it at once."""
        if not self.leading or self.client is None:
            return
        self._set(None, leading=False)
        try:
            lease = await self.client.get(Lease, self.config.lease_name)
            if lease.spec is not None and lease.spec.holderIdentity == self.identity:
                lease.spec.holderIdentity = None
                await self.client.replace(lease)
        except (ApiError, httpx2.HTTPError, OSError) as exc:
            log.warning("leader: could not release the Lease (%s: %s); it expires on its own",
                        type(exc).__name__, exc)  # fmt: skip
