"""Active health checks: every worker's /health, noted on the worker, and panic routing's
turns logged (see proxy.control.workers: when every worker of a role fails its check, the checks
are ignored for that role)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from proxy.control.workers import Health, Worker, WorkerPool
from proxy.engines.client import EngineClient
from proxy.errors import ProxyError

log = logging.getLogger("pdproxy")


class HealthChecker:
    def __init__(self, engine: EngineClient, pools: Sequence[WorkerPool], timeout: float) -> None:
        self.engine = engine
        self.pools = tuple(pools)
        self.timeout = timeout

    async def run(self, interval: float) -> None:
        """Check every `interval` seconds, forever (cancel the task to stop)."""
        while True:
            await self.check()
            await asyncio.sleep(interval)

    async def check(self) -> None:
        """Probe every worker's /health now and note the result on the worker."""
        await asyncio.gather(*(self._probe(pool, w) for pool in self.pools for w in pool.members))
        for pool in self.pools:
            was = pool.panic
            pool.refresh()
            if pool.panic and not was:
                log.warning(
                    "every %s worker fails its health check: routing to them anyway", pool.role
                )
            elif was and not pool.panic:
                log.warning(
                    "a %s worker passes its health check again: panic routing off", pool.role
                )

    async def _probe(self, pool: WorkerPool, worker: Worker) -> None:
        was = worker.health
        try:
            status, _ = await self.engine.get(worker, "/health", self.timeout)
        except ProxyError as exc:
            pool.record_check(worker, False, exc.message)
        else:
            pool.record_check(worker, status == 200, f"/health answered {status}")
        if worker.health is not was and was is not Health.UNKNOWN:
            log.warning("%s worker %s is now %s", pool.role, worker.url, worker.health.value)
