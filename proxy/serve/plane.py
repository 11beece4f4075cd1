"""The data plane, built from the config: the policies and the router over the worker pools,
the placement and the one planner, the legs' shared services, and the ASGI endpoints of the
generation paths and of vLLM's other paths (passed through)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.auth import Authenticator
from proxy.config import ProxyConfig
from proxy.control.workers import WorkerPool
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector
from proxy.engines.tokenize import TokenCounter
from proxy.flow.legs import Flow
from proxy.observe.metrics import ProxyMetrics
from proxy.observe.stats import LatencyStats
from proxy.observe.timeline import TimelineRing
from proxy.place.conditional import ConditionalDisagg
from proxy.place.dedicated import DedicatedPlacement
from proxy.place.plan import Placement
from proxy.place.planner import Planner
from proxy.place.policies import PolicyOptions, make_policy
from proxy.place.pool import Rules
from proxy.place.pooled import PoolPlacement
from proxy.place.prefix import PrefixIndex
from proxy.place.router import Router
from proxy.request import CHAT, COMPLETIONS
from proxy.serve.admission import Admission
from proxy.serve.endpoint import CompletionEndpoint, Services
from proxy.serve.passthrough import ROUTES, PassThrough


class Prompts(Protocol):
    """Who hears of each placed prompt: the pool's controller (proxy.control.pool), or in a
    serving process the report to the control process's controller (proxy.procs.report)."""

    def prompt(self, computed: int, long: bool) -> None: ...


@dataclass
class DataPlane:
    router: Router
    planner: Planner
    services: Services
    endpoints: dict[str, Any]  # path -> ASGI app, served before any framework code runs


def build_router(
    config: ProxyConfig, pools: tuple[WorkerPool, WorkerPool, WorkerPool], index: PrefixIndex
) -> Router:
    routing = config.routing
    options = PolicyOptions(
        routing.prefix_block_chars,
        routing.balance_abs,
        routing.balance_rel,
        routing.waiting_weight,
        routing.kv_high,
    )
    prefill, decode, pooled = pools
    return Router(
        prefill,
        decode,
        make_policy(config.prefill_policy, options, index),
        make_policy(config.decode_policy, options, index),
        pooled,
    )


def build_placement(
    config: ProxyConfig, router: Router, pool: Prompts | None
) -> tuple[Placement, float]:
    """The placement for the topology, and the /tokenize timeout its counts get."""
    routing = config.routing
    if config.has_pool:
        planner = config.pool_planner
        rules = Rules(
            config.pool_mode,
            planner.min_prefill_tokens,
            planner.local_max_tokens,
            planner.prefill_tokens_per_second,
            planner.max_prefill_wait,
        )
        prompts = None if pool is None else pool.prompt
        placement = PoolPlacement(
            router, routing.prefix_block_chars, rules, routing.waiting_weight, routing.kv_high,
            prompts,
        )  # fmt: skip
        return placement, planner.tokenize_timeout
    disagg = config.conditional_disagg
    conditional = ConditionalDisagg(disagg.min_prefill_tokens) if disagg.enabled else None
    return (
        DedicatedPlacement(router, routing.prefix_block_chars, conditional),
        disagg.tokenize_timeout,
    )


def prefix_chars(config: ProxyConfig) -> int:
    """Prompt characters the planner hashes: none unless something reads the prefix."""
    policies = {config.prefill_policy, config.decode_policy}
    wanted = (
        config.conditional_disagg.enabled
        or "prefix_aware" in policies
        or (bool(config.pool) and config.pool_mode == "adaptive")
    )
    return config.routing.prefix_chars if wanted else 0


def build_data_plane(
    config: ProxyConfig,
    pools: tuple[WorkerPool, WorkerPool, WorkerPool],
    engine: EngineClient,
    connector: Connector,
    metrics: ProxyMetrics,
    authenticator: Authenticator,
    pool: Prompts | None,
    index: PrefixIndex | None = None,
) -> DataPlane:
    routing = config.routing
    if index is None:
        index = PrefixIndex()  # the proxy's one prefix index: the planner's and prefix_aware's
    router = build_router(config, pools, index)
    placement, tokenize_timeout = build_placement(config, router, pool)
    planner = Planner(
        placement,
        TokenCounter(engine, tokenize_timeout),
        index,
        metrics.disagg_decisions,
        prefix_chars(config),
        routing.prefix_block_chars,
    )
    flow = Flow(
        planner,
        router,
        connector,
        engine,
        metrics,
        config.failover,
        config.timeouts.decode_first_byte,
        config.timeouts.decode_idle,
    )
    admission = config.admission
    services = Services(
        flow=flow,
        stats=LatencyStats(config.stats.window, metrics.registry),
        admission=Admission(admission.max_concurrent, admission.max_queue, admission.queue_timeout),
        auth=authenticator,
        max_body_bytes=config.max_body_bytes,
        fanout=config.fanout,
        timelines=TimelineRing(config.stats.timelines),
    )
    endpoints: dict[str, Any] = {
        CHAT: CompletionEndpoint(services, CHAT),
        COMPLETIONS: CompletionEndpoint(services, COMPLETIONS),
    }
    for path, method in ROUTES.items():  # vLLM's other endpoints, to a decoder as they are
        endpoints[path] = PassThrough(services, path, method)
    return DataPlane(router, planner, services, endpoints)
