"""The pool planner: what the request path calls to place a request when a pool is configured.

`plan` counts the prompt's tokens exactly (an engine's /tokenize; prompts of token ids as they
are), takes a snapshot of every routed engine (dedicated prefillers and decoders, and the
pool's, each with its lean), lets the pure plan (proxy.pool.plan) decide, counts the decision
in `pdproxy_disagg_decisions_total{decision,reason}` and hands the request path a
proxy.placement.Plan. Nothing is awaited after the snapshot.

`run` is the controller's loop (proxy.pool.controller): every `interval` seconds it samples the
decode streams, decides, moves the leans it decided, and logs why. Its state is in /stats
(`pool`) and /metrics (`pdproxy_pool_engines{lean}`, `pdproxy_pool_engine_lean{id,url,lean}`,
`pdproxy_pool_lean_changes_total{lean}`, the measured demand).

In colocated mode there is no controller and no /tokenize: every request goes whole to the
decode-capable engine with the least load, with its prompt size estimated from its characters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.config import PoolPlannerConfig
from proxy.control.ratio import Capacity, Change, EngineState, RatioController
from proxy.control.workers import Lean, Worker
from proxy.engines.client import EngineClient
from proxy.errors import NotFound, NoWorkerAvailable
from proxy.observe.metrics import ProxyMetrics
from proxy.place.disagg import count_tokens
from proxy.place.plan import Plan, PrefillWhere, Router
from proxy.place.policies import RequestInfo
from proxy.place.policies.load_aware import estimated_load
from proxy.place.pool import EngineView, Job, PoolMode, Rules, best_decoder, best_prefiller
from proxy.place.pool import plan as decide
from proxy.place.prefix import PrefixIndex, prefix_blocks
from proxy.request import ClientRequest

log = logging.getLogger("pdproxy")

CHARS_PER_TOKEN = 4  # a prompt's size when no engine counted it (English text, roughly)
# plans whose prompt wants computing on the prefill side (where one leans so)
PREFILL_SIDE_REASONS = frozenset(
    {"long", "no_prefiller", "slow_kv", "single_engine", "short_output", "prefill_busy"}
)


def max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class PoolPlanner:
    name = "pool"

    def __init__(
        self,
        router: Router,
        engine: EngineClient,
        metrics: ProxyMetrics,
        config: PoolPlannerConfig,
        mode: PoolMode = "adaptive",
        waiting_weight: float = 2.0,
        kv_high: float = 0.95,
        block_chars: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.engine = engine
        self.metrics = metrics
        self.config = config
        self.mode = mode
        self.rules = Rules(
            mode,
            config.min_prefill_tokens,
            config.local_max_tokens,
            config.prefill_tokens_per_second,
            config.max_prefill_wait,
        )
        self.waiting_weight = waiting_weight
        self.kv_high = kv_high
        self.block_chars = block_chars
        self.clock = clock
        self.index = PrefixIndex()
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
        self.lean_changes = Counter(
            "pdproxy_pool_lean_changes",
            "pool engines moved to lean to prefill or to decode by the controller",
            ["lean"],
            registry=metrics.registry,
        )
        metrics.registry.register(_PoolCollector(self))
        for worker in self.pooled:
            worker.lean = worker.lean or "decode"

    # --- the engines ---

    @property
    def pooled(self) -> tuple[Worker, ...]:
        assert self.router.pool is not None
        return self.router.pool.workers

    def routed(self) -> list[Worker]:
        """Every engine a plan may name: dedicated prefillers and decoders, then the pool's."""
        out: list[Worker] = []
        for pool in self.router.pools:
            pool.refresh()
            out += pool.workers
        return out

    def view(self, worker: Worker, cached_tokens: int = 0) -> EngineView:
        load = worker.engine_load
        lean: Lean = "prefill" if worker.role == "prefill" else "decode"
        if worker.role == "pool" and worker.lean is not None:
            lean = worker.lean
        return EngineView(
            role=worker.role,
            lean=lean,
            available=worker.available,
            load=estimated_load(worker, self.waiting_weight),
            prefill_tokens=worker.prefill_tokens,
            decode_streams=worker.decode_streams,
            kv_full=load is not None and load.kv_usage >= self.kv_high,
            slow_kv=worker.kv_transfer is not None and worker.kv_transfer.slow,
            cached_tokens=cached_tokens,
        )

    # --- placing a request ---

    async def count(self, request: ClientRequest) -> int | None:
        """The prompt's tokens from the least loaded decode-capable engine's /tokenize."""
        workers = self.routed()
        views = [self.view(w) for w in workers]
        capable = [i for i, v in enumerate(views) if v.can_decode]
        index = best_decoder(views, capable)
        if index is None:
            return None
        return await count_tokens(
            self.engine, request, workers[index], self.config.tokenize_timeout
        )

    async def plan(self, request: ClientRequest, info: RequestInfo) -> Plan:
        estimate = max(1, request.prompt_chars // CHARS_PER_TOKEN)
        exact = None if self.mode == "colocated" else await self.count(request)
        tokens = estimate if exact is None else exact
        blocks = prefix_blocks(info.prefix, self.block_chars) if info.prefix else []
        matched = self.index.matched(blocks) if blocks else {}
        size = max(request.prompt_chars, len(info.prefix), 1)
        workers = self.routed()  # the snapshot: nothing is awaited from here on
        views = [  # an engine without a prefix cache holds none of it (vllm:cache_config_info)
            self.view(w, int(tokens * min(1.0, matched.get(w.url, 0) * self.block_chars / size)))
            if w.caches_prefixes
            else self.view(w)
            for w in workers
        ]
        job = Job(tokens, max_tokens(request.body), request.local_reason)
        choice = decide(views, job, self.rules)
        if choice is None:
            raise NoWorkerAvailable("no engine of the pool or decode worker is available")
        decoder = workers[choice.decode]
        prefiller = None if choice.prefill is None else workers[choice.prefill]
        if blocks:
            self.index.record(blocks, decoder.url)
            if prefiller is not None:
                self.index.record(blocks, prefiller.url)
        if self.mode == "adaptive":  # what the controller sizes the two sides for
            long = choice.reason in PREFILL_SIDE_REASONS
            computed = tokens if long else tokens - views[choice.decode].cached_tokens
            self.controller.load.prompt(self.clock(), computed, long)
        where: PrefillWhere = "local" if prefiller is None else "remote"
        self.metrics.disagg_decisions.labels(where, choice.reason).inc()
        return Plan(decoder, prefiller, where, choice.reason, tokens)

    def pick_prefill(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another engine on the prefill side (then any that can prefill), least busy first."""
        return self._another(exclude, "prefill")

    def pick_decode(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another engine on the decode side (then any that can decode), least loaded first."""
        return self._another(exclude, "decode")

    def _another(self, exclude: Sequence[Worker], lean: Lean) -> Worker | None:
        workers = [w for w in self.routed() if w not in exclude]
        views = [self.view(w) for w in workers]
        capable = [
            i for i, v in enumerate(views) if (v.can_prefill if lean == "prefill" else v.can_decode)
        ]
        side = [i for i in capable if views[i].lean == lean] or capable
        best = best_prefiller if lean == "prefill" else best_decoder
        index = best(views, side)
        return None if index is None else workers[index]

    def forget(self, worker: Worker) -> None:
        self.index.forget(worker.url)

    # --- the controller ---

    def step(self) -> list[Change]:
        """One controller decision, applied: sample the streams, decide, move the engines it
        names (in manual mode: sample only)."""
        now = self.clock()
        routed = self.routed()
        self.controller.load.streams(now, sum(w.decode_streams for w in routed))
        if self.manual:
            return []
        dedicated = [w for w in routed if w.role != "pool" and w.available]
        engines = [
            EngineState(w.id, w.available, w.lean or "decode", w.decode_streams, w.prefill_tokens)
            for w in self.pooled
        ]
        changes = self.controller.decide(
            now,
            engines,
            sum(1 for w in dedicated if w.role == "prefill"),
            sum(1 for w in dedicated if w.role == "decode"),
        )
        for worker in self.pooled:
            worker.lean = worker.lean or "decode"
        by_id = {w.id: w for w in self.pooled}
        for change in changes:
            self._lean(by_id[change.id], change.lean, change.why)
        return changes

    def _lean(self, worker: Worker, lean: Lean, why: str) -> None:
        worker.lean = lean
        self.lean_changes.labels(lean).inc()
        up = [w for w in self.pooled if w.available]
        prefill = sum(1 for w in up if w.lean == "prefill")
        self.changes.append(
            {
                "at": round(time.time(), 3),
                "id": worker.id,
                "url": worker.url,
                "lean": lean,
                "prefill": prefill,
                "decode": len(up) - prefill,
                "why": why,
            }
        )
        log.info(
            "pool: %s (%s) now leans to %s; %d prefill, %d decode: %s",
            worker.id,
            worker.url,
            lean,
            prefill,
            len(up) - prefill,
            why,
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
        if controller is not None:
            self.manual = controller == "manual"
            log.info("pool: the controller is %s", "paused (manual leans)" if self.manual else "on")
        for key, lean in leans.items():
            if by_id[key].lean != lean:
                self._lean(by_id[key], lean, "set through the admin API")

    async def run(self) -> None:
        """Decide every `interval` seconds (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self.config.interval)
            self.step()

    def describe(self) -> dict[str, Any]:
        """The pool's state for /stats and the console."""
        demand = self.controller.last_demand
        engines = {w.id: w.lean or "decode" for w in self.pooled}
        up = [w for w in self.pooled if w.available]
        return {
            "mode": self.mode,
            "controller": "off"
            if self.mode == "colocated"
            else "manual"
            if self.manual
            else "auto",
            "engines": engines,
            "prefill": sum(1 for w in up if (w.lean or "decode") == "prefill"),
            "decode": sum(1 for w in up if (w.lean or "decode") == "decode"),
            "target_prefill": self.controller.target,
            "demand": {
                "long_tokens_per_second": round(demand.long_tokens_per_second, 1),
                "local_tokens_per_second": round(demand.local_tokens_per_second, 1),
                "streams": round(demand.streams, 2),
            },
            "split_costs": [round(c, 4) for c in self.controller.last_costs],
            "changes": list(self.changes),
        }


class _PoolCollector(Collector):
    """The pool's assignment and measured demand, read at scrape time."""

    def __init__(self, planner: PoolPlanner) -> None:
        self._planner = planner

    def collect(self) -> Iterable[Metric]:
        planner = self._planner
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
        up = [w for w in planner.pooled if w.available]
        for side in ("prefill", "decode"):
            engines.add_metric([side], sum(1 for w in up if (w.lean or "decode") == side))
        for w in planner.pooled:
            for side in ("prefill", "decode"):
                lean.add_metric([w.id, w.url, side], 1.0 if (w.lean or "decode") == side else 0.0)
        demand = planner.controller.last_demand
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
