"""The decisions several replicas share: one ConfigMap (`discovery.leader.configmap`).

    steps       [{"at", "leans", "controller", "by"}]: the pool's last decisions, each in
                effect from `at` (wall clock, seconds since the epoch); the newest few are kept
    leans       {engine URL: "prefill" | "decode"}: the newest step's leans (for people)
    controller  "auto" (the leader's controller decides) or "manual" (an operator's pins hold)
    effective   the newest step's `at`
    drains      [{"url", "pod"}]: workers drained through any replica's admin API (the leader
                drops a pod's entries once the pod leaves: Ready again, it serves again)
    by          the replica that wrote last

One ConfigMap rather than annotations on the engine pods: the leans, the controller's mode and
the drains change together and are read together, and one object has one resourceVersion, so a
write is all or nothing and two writers cannot interleave (the loser gets 409 Conflict, reads
again and merges). Annotations would take one patch per pod, a partial state between them, and a
pod's replacement would lose what was decided about its engine's address.

Only the Lease holder's controller decides (proxy.control.pool.PoolController.follows). A lean
decision, the leader's or a pin (PUT /admin/pool) through any replica, moves no engine when it
is made: it is written as a step whose `at` is `leader.effective_delay` seconds later, longer
than `renew_interval`, the time every replica takes to read the ConfigMap again. Every replica,
the one that wrote it too, applies each step at its `at` by its own clock, so that all of them
change their leans at the same instant (to within their clocks' skew); a step read after its
`at` (a replica that was cut off) is applied at once, and a step older than the one in effect is
never applied. A pin written while the leader decides wins: the leader's write conflicts, it
reads the pin, and its controller's step is dropped.

Drains (DELETE /admin/workers through any replica) do not wait: the replica asked drains at once
and writes the drain here, and the others drain it when they next read (within
`renew_interval`). Taking traffic off an engine early is never wrong, and the operator's 202
means it is draining. With no leader (the API server unreachable past the lease duration) no
replica decides and the last leans hold: the same on every replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
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
Step = dict[str, Any]  # {"at": float, "leans": {url: lean}, "controller": str, "by": str}
KEPT = 8  # steps kept in the ConfigMap: more than a reader can miss within one delay


def steps_in(data: Data) -> list[Step]:
    """The steps the ConfigMap holds; leans written without steps (by an earlier version) are
    one step in effect since ever."""
    if "steps" in data:
        return cast(list[Step], json.loads(data["steps"]))
    if "leans" in data:
        mode = data.get("controller") or "auto"
        return [{"at": 0.0, "leans": json.loads(data["leans"]), "controller": mode, "by": "?"}]
    return []


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
        self._tasks: set[asyncio.Task[None]] = set()
        self.steps: list[Step] = []  # read, not yet in effect, by `at`
        self.effective = -math.inf  # `at` of the step in effect here
        self.leans: dict[str, Lean] = {}  # ...and its leans (for engines that join later)
        self._timers: dict[float, asyncio.TimerHandle] = {}
        if pool is not None:
            pool.follows = lambda: not elector.leading
            pool.publish = self._publish
        admin.drain_hooks.append(self._drained)
        admin.registry.on_added.append(self._joined)

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
            if self.elector.leading and self.pool is not None:  # the first leader publishes
                self._publish({}, None, "controller")
            return
        self._learn(data)

    async def _read(self) -> Data | None:
        assert self.client is not None
        try:
            found = await self.client.get(ConfigMap, self.config.configmap)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        return dict(found.data or {})

    def _learn(self, data: Data) -> None:
        """What the ConfigMap holds: steps scheduled at their instants, drains done."""
        known = {step["at"] for step in self.steps}
        for step in steps_in(data):
            if step["at"] > self.effective and step["at"] not in known:
                self.steps.append(step)
        self.steps.sort(key=lambda step: float(step["at"]))
        self._due()
        self._drain(json.loads(data.get("drains") or "[]"), data.get("by") or "another replica")

    def _due(self) -> None:
        """Apply the newest step whose instant has come; set a timer for each later one."""
        now = time.time()
        due = [step for step in self.steps if step["at"] <= now]
        self.steps = [step for step in self.steps if step["at"] > now]
        if due and self.pool is not None:
            step = due[-1]
            self.effective, self.leans = step["at"], dict(step["leans"])
            manual = step.get("controller") == "manual"
            self.pool.apply(self.leans, manual, step.get("by") or "another replica", step["at"])
        loop = asyncio.get_running_loop()
        for step in self.steps:
            if step["at"] not in self._timers:
                self._timers[step["at"]] = loop.call_later(step["at"] - now, self._fire, step["at"])
        if self.pool is not None:
            self.pool.pending = dict(self.steps[-1]["leans"]) if self.steps else {}

    def _fire(self, at: float) -> None:
        self._timers.pop(at, None)
        self._due()

    def _joined(self, worker: Worker) -> None:
        """A pool engine routed from now on takes the lean in effect for its address."""
        lean = self.leans.get(worker.url)
        if worker.role == "pool" and lean is not None:
            worker.lean = lean

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

    @property
    def delay(self) -> float:
        return self.config.effective_delay or self.config.renew_interval + 1.0

    def _publish(self, leans: dict[str, Lean], manual: bool | None, source: str) -> None:
        """A decision of this replica's (`source`: "controller", the leader's; "admin", a pin):
        these engines' leans, and the controller's mode unless None, as a new step `delay`
        seconds from now, over the newest step's leans. Applied here only at that instant."""
        if source == "controller" and not self.elector.leading:
            return
        assert self.pool is not None
        here = self.pool.leans()

        def change(data: Data) -> bool:
            steps = steps_in(data)
            first: Step = {"at": 0.0, "leans": here, "controller": "auto"}
            newest = steps[-1] if steps else first
            if source == "controller" and newest["controller"] == "manual":
                return False  # an operator's pins came first: they hold
            if (
                source == "controller"
                and steps
                and all(newest["leans"].get(url) == lean for url, lean in leans.items())
            ):
                return False  # nothing new (the first leader's publication)
            mode = newest["controller"] if manual is None else ("manual" if manual else "auto")
            at = round(max(time.time() + self.delay, newest["at"] + 0.001), 3)
            step = {"at": at, "leans": {**newest["leans"], **leans}, "controller": mode,
                    "by": self.elector.identity}  # fmt: skip
            data["steps"] = json.dumps([*steps, step][-KEPT:])
            data["leans"] = json.dumps(step["leans"], sort_keys=True)
            data["controller"] = mode
            data["effective"] = f"{at:.3f}"
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
        task = asyncio.create_task(self._write(change, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, change: Callable[[Data], bool], what: str) -> None:
        """Read, change, write at the version read; again on a conflict."""
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
        if change(data):
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
        self._learn(data)
        return True

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
