"""The pool's controller loop: every `interval` seconds it samples the decode streams, lets the
ratio controller (proxy.control.ratio) decide how many pool engines lean to prefill and how
many to decode, moves the leans it decided, and logs why. An operator can set leans and pause
it (PUT /admin/pool). Its state is in /stats (`pool`) and /metrics (`pdproxy_pool_engines{lean}`,
`pdproxy_pool_engine_lean{id,url,lean}`, `pdproxy_pool_lean_changes_total{lean}`, the measured
demand).

The placement (proxy.place.pooled) only reads the leans; it reports each placed prompt's
computed tokens through `prompt`, which the controller sizes the two sides for. A lean change
only steers new requests: a request keeps the engines its plan named to its end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import PoolPlannerConfig
from proxy.control.ratio import Capacity, Change, EngineState, RatioController
from proxy.control.workers import Lean, Worker, WorkerPool
from proxy.errors import NotFound

log = logging.getLogger("pdproxy")


class PoolController:
    def __init__(
        self,
        pools: tuple[WorkerPool, WorkerPool, WorkerPool],
        config: PoolPlannerConfig,
        mode: str,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pools = pools  # prefill, decode, pool
        self.config = config
        self.mode = mode
        self.clock = clock
        self.controller = RatioController(
            Capacity(
                config.prefill_tokens_per_second,
                config.decode_streams,
                config.target_utilization,
                config.decode_prefill_share,
            ),
            config.window,
            config.hysteresis,
            config.hold,
            config.min_dwell,
            clock(),
        )
        self.changes: deque[dict[str, Any]] = deque(maxlen=50)
        self.manual = False  # an operator set the leans (PUT /admin/pool): the controller waits
        # several replicas (discovery.leader): a follower decides nothing of its own; with
        # `publish` set, a decision (the leader's controller's, or a pin through PUT
        # /admin/pool) moves no engine here: it is published, and every replica applies it at
        # the same instant through `apply` (proxy.control.membership.shared); `pending` holds
        # the leans published and not yet in effect, which the controller decides from
        self.follows: Callable[[], bool] = lambda: False
        self.publish: Callable[[dict[str, Lean], bool | None, str], None] | None = None
        self.pending: dict[str, Lean] = {}
        self.lean_changes = Counter(
            "pdproxy_pool_lean_changes",
            "pool engines moved to lean to prefill or to decode by the controller",
            ["lean"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pdproxy_pool_prompt_tokens",
            "prompt tokens this replica placed that an engine computes, by side: long (a "
            "prefill-leaning engine's) or local (prefilled where it decodes)",
            ["side"],
            registry=registry,
        )
        for side in ("long", "local"):
            self.prompt_tokens.labels(side)
        registry.register(_PoolCollector(self))
        for worker in self.pooled:
            worker.lean = worker.lean or "decode"

    @property
    def pooled(self) -> tuple[Worker, ...]:
        return self.pools[2].workers

    def prompt(self, computed: int, long: bool) -> None:
        """A request was placed: `computed` prompt tokens, on the prefill side if `long`."""
        self.controller.load.prompt(self.clock(), computed, long)
        self.prompt_tokens.labels("long" if long else "local").inc(computed)

    def peer_prompts(self, long: int, local: int) -> None:
        """The prompt tokens the other replicas placed since the last call (the leader reads
        them: proxy.control.membership.peers), for the controller's window."""
        now = self.clock()
        if long:
            self.controller.load.prompt(now, long, True)
        if local:
            self.controller.load.prompt(now, local, False)

    def step(self) -> list[Change]:
        """One controller decision, applied: sample the streams, decide, move the engines it
        names (in manual mode: sample only)."""
        now = self.clock()
        routed: list[Worker] = []
        for pool in self.pools:
            pool.refresh()
            routed += pool.workers
        self.controller.load.streams(now, sum(w.decode_streams for w in routed))
        for worker in self.pooled:  # engines that joined since (discovered) lean to decode
            worker.lean = worker.lean or "decode"
        if self.manual or self.follows():
            return []
        dedicated = [w for w in routed if w.role != "pool" and w.available]
        engines = [
            EngineState(
                w.id,
                w.available,
                self.pending.get(w.url) or w.lean or "decode",
                w.decode_streams,
                w.prefill_tokens,
            )
            for w in self.pooled
        ]
        changes = self.controller.decide(
            now,
            engines,
            sum(1 for w in dedicated if w.role == "prefill"),
            sum(1 for w in dedicated if w.role == "decode"),
        )
        by_id = {w.id: w for w in self.pooled}
        if self.publish is not None and changes:
            for change in changes:
                worker = by_id[change.id]
                log.info("pool: %s (%s) is to lean to %s, published to every replica: %s",
                         worker.id, worker.url, change.lean, change.why)  # fmt: skip
            self.publish({by_id[c.id].url: c.lean for c in changes}, None, "controller")
            return changes
        for change in changes:
            self._lean(by_id[change.id], change.lean, change.why)
        return changes

    def _sides(self) -> tuple[int, int]:
        """Available pool engines leaning to prefill, and to decode."""
        up = [w for w in self.pooled if w.available]
        prefill = sum(1 for w in up if (w.lean or "decode") == "prefill")
        return prefill, len(up) - prefill

    def _lean(self, worker: Worker, lean: Lean, why: str, effective: float | None = None) -> None:
        worker.lean = lean
        self.lean_changes.labels(lean).inc()
        prefill, decode = self._sides()
        self.changes.append(
            {
                "at": round(time.time(), 3),
                "id": worker.id,
                "url": worker.url,
                "lean": lean,
                "prefill": prefill,
                "decode": decode,
                "why": why,
                **({} if effective is None else {"effective": effective}),
            }
        )
        log.info(
            "pool: %s (%s) now leans to %s; %d prefill, %d decode: %s",
            *(worker.id, worker.url, lean, prefill, decode, why),
        )

    def update(self, leans: dict[str, Lean], controller: str | None) -> None:
        """An operator's change (PUT /admin/pool): set these engines' leans, and let the
        controller go on deciding (`auto`) or not (`manual`). Unknown ids change nothing."""
        by_id = {w.id: w for w in self.pooled}
        unknown = sorted(set(leans) - set(by_id))
        if unknown:
            raise NotFound(
                f"no active pool engine {', '.join(unknown)}; the pool has "
                f"{', '.join(by_id) or 'none'}"
            )
        if self.publish is not None:  # several replicas: every one applies it at one instant
            manual = None if controller is None else controller == "manual"
            self.publish({by_id[k].url: lean for k, lean in leans.items()}, manual, "admin")
            return
        if controller is not None:
            self.manual = controller == "manual"
            log.info("pool: the controller is %s", "paused (manual leans)" if self.manual else "on")
        for key, lean in leans.items():
            if by_id[key].lean != lean:
                self._lean(by_id[key], lean, "set through the admin API")

    def leans(self) -> dict[str, Lean]:
        """Each pool engine's lean, by URL (the same engine on every replica)."""
        return {w.url: w.lean or "decode" for w in self.pooled}

    def apply(self, leans: dict[str, Lean], manual: bool, who: str, effective: float) -> None:
        """Decisions published by `who` (the shared decisions), in effect from `effective`
        (wall clock): the engines named take these leans; engines not named keep theirs."""
        if manual != self.manual:
            self.manual = manual
            log.info("pool: the controller is %s by %s", "paused" if manual else "on", who)
        for worker in self.pooled:
            lean = leans.get(worker.url)
            if lean is not None and (worker.lean or "decode") != lean:
                self._lean(worker, lean, f"published by {who}", effective)

    async def run(self) -> None:
        """Decide every `interval` seconds (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.config.interval)
            self.step()

    def describe(self) -> dict[str, Any]:
        """The pool's state for /stats and the console."""
        demand = self.controller.last_demand
        prefill, decode = self._sides()
        controller = "manual" if self.manual else "auto"
        return {
            "mode": self.mode,
            "controller": "off" if self.mode == "colocated" else controller,
            "engines": {w.id: w.lean or "decode" for w in self.pooled},
            "prefill": prefill,
            "decode": decode,
            "target_prefill": self.controller.target,
            "demand": {
                "long_tokens_per_second": round(demand.long_tokens_per_second, 1),
                "local_tokens_per_second": round(demand.local_tokens_per_second, 1),
                "streams": round(demand.streams, 2),
            },
            "split_costs": [round(c, 4) for c in self.controller.last_costs],
            "pending": dict(self.pending),
            "changes": list(self.changes),
        }


class _PoolCollector(Collector):
    """The pool's assignment and measured demand, read at scrape time."""

    def __init__(self, pool: PoolController) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        pool = self._pool
        engines = GaugeMetricFamily(
            "pdproxy_pool_engines",
            "available pool engines leaning to prefill or to decode now",
            labels=["lean"],
        )
        lean = GaugeMetricFamily(
            "pdproxy_pool_engine_lean",
            "1 for the side each pool engine leans to now",
            labels=["id", "url", "lean"],
        )
        prefill, decode = pool._sides()
        engines.add_metric(["prefill"], prefill)
        engines.add_metric(["decode"], decode)
        for w in pool.pooled:
            for side in ("prefill", "decode"):
                lean.add_metric([w.id, w.url, side], 1.0 if (w.lean or "decode") == side else 0.0)
        demand = pool.controller.last_demand
        measured = GaugeMetricFamily(
            "pdproxy_pool_demand",
            "load the pool's controller measured over its window: long and local prompt "
            "tokens per second, decode streams",
            labels=["kind"],
        )
        measured.add_metric(["long_tokens_per_second"], demand.long_tokens_per_second)
        measured.add_metric(["local_tokens_per_second"], demand.local_tokens_per_second)
        measured.add_metric(["streams"], demand.streams)
        yield engines
        yield lean
        yield measured
