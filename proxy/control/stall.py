"""The stall watch: an engine that has legs waiting on it and has completed nothing for
`stall_timeout` seconds is taken out of rotation, whatever its /health says.

A wedged engine can keep answering /health while it completes no request (LMCache PD with a
full receive buffer blocks the prefiller's save: README, "LMCache PD"); the health checks then
keep it in rotation and every request sent to it waits out its deadline. The watch looks at
what the request path reports (proxy.control.waits): each waiting leg (a prefill leg, a
streamed decode leg before its first bytes) and each worker's last progress (a completed leg,
streamed bytes), and the engine's own work: its prompt and generated token counters, read from
its /metrics by the scraper (`watch`). A slow engine (a starved CPU, a long prompt ahead in its
queue) raises them while it completes nothing the proxy sent; a wedged one does not, since its
engine step is what waits. When the oldest waiting leg and the last progress are both older than the
timeout, it opens the worker's breaker (a trial request after `health.cooldown` brings it back
once one succeeds), warns once with the likely cause, and ends the waiting legs with an
UpstreamTimeout: each request's failover takes it to another prefiller, to the decoder's own
prefill where `failover.fallback_local_prefill` allows, or to a clear error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter

from proxy.control.workers import Breaker, Worker, WorkerPool
from proxy.engines.promtext import Samples
from proxy.engines.scrape import Watch

log = logging.getLogger("pdproxy")

CAUSES = {
    "prefill": "the engine is likely wedged: with LMCache PD, a decoder's receive buffer "
    "(pd_buffer_size) full of chunks it never loads blocks the prefiller's save (see README, "
    "LMCache PD); otherwise see the engine's log",
    "decode": "the engine is likely wedged; see its log",
    "pool": "the engine is likely wedged; see its log",
}
# vLLM's counters of the work its engine steps did; any change is progress (a restart lowers them)
WORK = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


@dataclass
class StallWatch:
    pools: Callable[[], Iterable[WorkerPool]]
    timeout: float
    clock: Callable[[], float] = perf_counter

    def quiet(self, worker: Worker, now: float) -> float:
        """Seconds the worker has had legs waiting on it and completed nothing (0: none)."""
        if not worker.waiting:
            return 0.0
        oldest = min(wait.started for wait in worker.waiting)
        return now - max(oldest, worker.last_progress)

    def watch(self, interval: float, timeout: float) -> Watch:
        """What the scraper reads for it: every engine's work counters."""
        return Watch(WORK, self.observe_work, interval, timeout)

    def observe_work(self, worker: Worker, samples: Samples | None) -> None:
        """A scrape of the worker's /metrics: a change in its work counters is progress. An
        unreadable engine, or one that does not publish them, proves nothing."""
        if samples is None or not (found := samples.sums(WORK)):
            return
        done = sum(found.values())
        if worker.engine_work is not None and done != worker.engine_work:
            worker.last_progress = self.clock()
        worker.engine_work = done

    def check(self, now: float | None = None) -> list[Worker]:
        """Trip every worker quiet for `timeout` seconds; the ones tripped."""
        now = self.clock() if now is None else now
        tripped = []
        for pool in self.pools():
            for worker in pool.members:
                quiet = self.quiet(worker, now)
                if quiet >= self.timeout:
                    self.trip(pool, worker, quiet)
                    tripped.append(worker)
        return tripped

    def trip(self, pool: WorkerPool, worker: Worker, quiet: float) -> None:
        waits = list(worker.waiting)
        reason = (
            f"{worker.role} worker {worker.url} stopped completing requests: {len(waits)} "
            f"waiting on it, none completed for {quiet:.0f}s (health.stall_timeout "
            f"{self.timeout:g}s)"
        )
        if worker.breaker is Breaker.CLOSED:  # once per stall; a failed trial says less
            log.warning(
                "%s, whatever its /health says; %s. It is out of rotation until a trial "
                "request succeeds.",
                reason,
                CAUSES.get(worker.role, CAUSES["decode"]),
            )
        else:
            log.info("%s: still stalled, out of rotation", reason)
        pool.trip(worker, reason)
        worker.last_progress = self.clock()  # a trial's wait starts the clock again
        for wait in waits:
            wait.abort(reason)

    async def run(self, interval: float) -> None:
        """Check every `interval` seconds (cancel the task to stop)."""
        while True:
            await asyncio.sleep(interval)
            self.check()
