"""The decisions several replicas share: one ConfigMap (`discovery.leader.configmap`).

    leans       {engine URL: "prefill" | "decode"}: the adaptive pool's leans
    controller  "auto" (the leader's controller decides) or "manual" (an operator's pins hold)
    drains      [{"url", "pod"}]: workers drained through any replica's admin API (the leader
                drops a pod's entries once the pod leaves: Ready again, it serves again)
    by          the replica that wrote last

One ConfigMap rather than annotations on the engine pods: the leans, the controller's mode and
the drains change together and are read together, and one object has one resourceVersion, so a
write is all or nothing and two writers cannot interleave (the loser gets 409 Conflict, reads
again and merges). Annotations would take one patch per pod, a partial state between them, and a
pod's replacement would lose what was decided about its engine's address.

Only the Lease holder's controller decides (proxy.control.pool.PoolController.follows); it
publishes each decision. Every replica, the leader too, reads the ConfigMap every
`renew_interval` and applies it: the leans and the mode to its pool, the drains to its workers.
A pin (PUT /admin/pool) or a drain (DELETE /admin/workers) through any replica is written here
at once, so every replica applies it; a pin written while the leader decides wins (the leader's
write then conflicts, and it reads the pin). With no leader (the API server unreachable past the
lease duration) no replica decides and the last leans hold: the same on every replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, cast

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap

from proxy.control.admin.service import Admin
from proxy.control.membership.config import LeaderConfig
from proxy.control.membership.leader import LeaderElector
from proxy.control.pool import PoolController
from proxy.control.workers import Lean, Lifecycle, Worker
from proxy.errors import ProxyError

log = logging.getLogger("pdproxy")

ERRORS = (ApiError, httpx2.HTTPError, OSError, ValueError)
Data = dict[str, str]


class SharedDecisions:
    def __init__(
        self,
        config: LeaderConfig,
        elector: LeaderElector,
        admin: Admin,
        pool: PoolController | None,
    ) -> None:
        self.client: AsyncClient | None = None  # the discovery's, once it has started
        self.config = config
        self.elector = elector
        self.admin = admin
        self.pool = pool
        self._lock = asyncio.Lock()
        self._pending = 0  # this replica's changes not yet written: a read must not undo them
        self._tasks: set[asyncio.Task[None]] = set()
        if pool is not None:
            pool.follows = lambda: not elector.leading
            pool.changed.append(self._pool_changed)
        admin.drain_hooks.append(self._drained)

    # --- reading ---

    async def run(self) -> None:
        """Read and apply the shared decisions every renew_interval (cancel to stop)."""
        while True:
            try:
                await self.sync()
            except ERRORS as exc:
                log.warning("shared decisions: cannot read ConfigMap %s (%s: %s); the last ones "
                            "hold", self.config.configmap, type(exc).__name__, exc)  # fmt: skip
            await asyncio.sleep(self.config.renew_interval)

    async def sync(self) -> None:
        async with self._lock:
            data = await self._read()
        if data is None:
            if self.elector.leading and self.pool is not None:
                self._pool_changed("controller")  # the first leader publishes what it has
            return
        if self._pending == 0:
            self._apply(data)

    async def _read(self) -> Data | None:
        assert self.client is not None
        try:
            found = await self.client.get(ConfigMap, self.config.configmap)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        return dict(found.data or {})

    def _apply(self, data: Data) -> None:
        who = data.get("by") or "another replica"
        if self.pool is not None and "leans" in data:
            leans = cast(dict[str, Lean], json.loads(data["leans"]))
            self.pool.apply(leans, data.get("controller") == "manual", who)
        self._drain(json.loads(data.get("drains") or "[]"), who)

    def _drain(self, entries: list[dict[str, Any]], who: str) -> None:
        for entry in entries:
            for worker in self._workers():
                if worker.state is not Lifecycle.ACTIVE or worker.url != entry.get("url"):
                    continue
                if entry.get("pod") and worker.pod != entry["pod"]:
                    continue
                log.info("worker %s (%s) drained as %s asked", worker.id, worker.url, who)
                try:
                    self.admin.remove(worker.id, force=True)
                except ProxyError as exc:
                    log.error("cannot drain worker %s: %s", worker.id, exc.message)

    def _workers(self) -> list[Worker]:
        return [w for pool in self.admin.registry.pools.values() for w in pool.members]

    # --- writing ---

    def _pool_changed(self, source: str) -> None:
        """This replica's pool changed: the leader's controller decided, or an operator pinned
        (through any replica). Written at once; reads wait until it is."""
        if source == "controller" and not self.elector.leading:
            return
        assert self.pool is not None
        leans, manual = self.pool.leans(), self.pool.manual

        def change(data: Data) -> bool:
            if source == "controller" and data.get("controller") == "manual":
                return False  # an operator's pins came first: they hold
            data["leans"] = json.dumps(leans, sort_keys=True)
            data["controller"] = "manual" if manual else "auto"
            return True

        self._spawn(change, f"the pool's leans ({source})")

    def _drained(self, worker: Worker) -> None:
        entry = {"url": worker.url, "pod": worker.pod}

        def change(data: Data) -> bool:
            drains = json.loads(data.get("drains") or "[]")
            if entry in drains:
                return False
            data["drains"] = json.dumps([*drains, entry])
            return True

        self._spawn(change, f"the drain of {worker.id}")

    def forget_drain(self, pod: str) -> None:
        """The pod left (deleted, not Ready): the leader drops the drains asked of its worker,
        so that the pod, Ready again, serves again (as with one replica)."""
        if not self.elector.leading:
            return

        def change(data: Data) -> bool:
            drains = json.loads(data.get("drains") or "[]")
            kept = [d for d in drains if d.get("pod") != pod]
            if kept == drains:
                return False
            data["drains"] = json.dumps(kept)
            return True

        self._spawn(change, f"the end of the drains of pod {pod}")

    def _spawn(self, change: Callable[[Data], bool], what: str) -> None:
        self._pending += 1
        task = asyncio.create_task(self._write(change, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, change: Callable[[Data], bool], what: str) -> None:
        """Read, change, write at the version read; again on a conflict."""
        try:
            async with self._lock:
                for _ in range(10):
                    try:
                        if await self._try(change):
                            return
                    except ERRORS as exc:
                        log.warning("shared decisions: cannot publish %s (%s: %s)", what,
                                    type(exc).__name__, exc)  # fmt: skip
                        return
                log.warning("shared decisions: %s lost ten conflicts in a row", what)
        finally:
            self._pending -= 1

    async def _try(self, change: Callable[[Data], bool]) -> bool:
        """One attempt: True when done (written, or nothing to write)."""
        assert self.client is not None
        name = self.config.configmap
        try:
            found: ConfigMap | None = await self.client.get(ConfigMap, name)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            found = None
        data = dict(found.data or {}) if found is not None else {}
        if not change(data):
            if found is not None and self._pending == 1:  # no other change of ours waits
                self._apply(data)
            return True
        data["by"] = self.elector.identity
        try:
            if found is None:
                await self.client.create(ConfigMap(metadata=ObjectMeta(name=name), data=data))
            else:
                found.data = data
                await self.client.replace(found)
        except ApiError as exc:
            if exc.status.code == 409:  # another replica wrote in between: read again
                return False
            raise
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
