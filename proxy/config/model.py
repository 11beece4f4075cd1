"""ProxyConfig, the whole configuration, and how it is loaded: a YAML file gives the base,
command-line flags override it, and validation runs once, at start-up, with messages that name
what to change."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from proxy.config.sections import (
    AdmissionConfig,
    AuthConfig,
    ConfigError,
    DisaggConfig,
    FailoverConfig,
    FanoutConfig,
    HealthConfig,
    KvEventsConfig,
    KvHealthConfig,
    PolicyName,
    PoolMode,
    PoolPlannerConfig,
    RoutingConfig,
    StatsConfig,
    TimeoutsConfig,
    WorkerConfig,
    _Model,
)
from proxy.control.admin.config import AdminConfig
from proxy.control.identity import duplicates
from proxy.control.membership.config import DiscoveryConfig
from proxy.engines.connectors.lmcache_config import LMCacheConfig
from proxy.engines.connectors.registry import (
    connector_class,
    pool_connectors,
    replica_connectors,
)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ProxyConfig(_Model):
    host: str = Field("127.0.0.1", description="address the proxy listens on (--host)")
    port: int = Field(9100, ge=0, le=65535, description="port the proxy listens on (--port)")
    connector: str = Field(
        "nixl", description="KV-transfer protocol (--connector): nixl or lmcache"
    )
    prefill: tuple[WorkerConfig, ...] = Field(
        (), description="the prefill engines (--prefill URL); required unless there is a pool"
    )
    decode: tuple[WorkerConfig, ...] = Field(
        (), description="the decode engines (--decode URL); required unless there is a pool"
    )
    pool: tuple[WorkerConfig, ...] = Field(
        (),
        description="engines that both prefill and decode (NIXL kv_role kv_both), placed per "
        "request by the pool planner (--pool URL)",
    )
    pool_mode: PoolMode = Field(
        "adaptive",
        description="adaptive: the pool planner decides per request; colocated: every request "
        "whole on the least loaded pool engine (no PD, no /tokenize)",
    )
    pool_planner: PoolPlannerConfig = Field(default_factory=PoolPlannerConfig)
    prefill_policy: PolicyName = Field(
        "least_loaded",
        description="how a prefiller is chosen: least_loaded (fewest in-flight requests, ties "
        "by in-flight prompt size), round_robin, load_aware, prefix_aware (README: Routing "
        "policies)",
    )
    decode_policy: PolicyName = Field(
        "least_loaded", description="how a decoder is chosen: as prefill_policy"
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    conditional_disagg: DisaggConfig = Field(default_factory=DisaggConfig)
    kv_health: KvHealthConfig = Field(default_factory=KvHealthConfig)
    kv_events: KvEventsConfig = Field(default_factory=KvEventsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    workers: int | Literal["auto"] = Field(
        1,
        description="serving processes (--workers): 1 serves in one process, as always; N > 1 "
        "starts a control process and N serving processes that share the port (README: "
        "Serving processes); auto: the usable cores less one, at least 1",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="seconds in-flight requests get after SIGTERM, and on a worker being removed",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="larger request bodies get a 413"
    )
    engine_api_key: str | None = Field(
        None, description="sent to the engines as a Bearer token (their vLLM --api-key)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the proxy's log level (--log-level)"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="the event loop the proxy serves on: uvloop (more requests per core) or "
        "asyncio's own, which a saturated process serves more evenly (README: Serving processes)",
    )
    busy_poll: float | None = Field(
        None,
        ge=0,
        description="seconds a serving process's event loop keeps polling after its last request "
        "ends, instead of sleeping (--busy-poll); it polls while requests are in flight too; 0: "
        "only then (measured no better than off); unset: never. Costs the process's core while "
        "it polls; saves the wake-ups of a halted core on the way to the first token, the "
        "request's arrival's above all (README: The proxy's own cost on a GPU host)",
    )
    # connector lmcache: the notification socket and its deadline
    # (see proxy.engines.connectors.lmcache_config)
    lmcache: LMCacheConfig = Field(default_factory=LMCacheConfig)
    # run-time workers: the admin API, its probes and allow-list (see proxy.control.admin.config)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    workers_state_file: str | None = Field(
        None, description="the workers after each change, read back at start-up"
    )
    # workers found by watching outside the proxy (see proxy.control.membership)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("workers must be at least 1, or auto")
        return value

    @property
    def serving_processes(self) -> int:
        """How many serving processes `workers` asks for (auto: the usable cores less one)."""
        if self.workers == "auto":
            return max(1, usable_cores() - 1)
        return self.workers

    @field_validator("connector")
    @classmethod
    def _known_connector(cls, value: str) -> str:
        connector_class(value)  # raises ValueError naming the known ones
        return value

    @field_validator("prefill", "decode", "pool", mode="before")
    @classmethod
    def _urls_as_workers(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _check_workers(self) -> ProxyConfig:
        for role in ("prefill", "decode", "pool"):
            workers: tuple[WorkerConfig, ...] = getattr(self, role)
            discovered = self.discovery.source != "static"
            if not workers and not self.pool and role != "pool" and not discovered:
                raise ValueError(
                    f"no {role} workers: give --{role} URL or a '{role}:' list (or a pool)"
                )
        listed = [
            (role, w.url) for role in ("prefill", "decode", "pool") for w in getattr(self, role)
        ]
        for i, j, why in duplicates(listed):
            (role_i, url_i), (role_j, url_j) = listed[i], listed[j]
            if role_i == role_j and why == "the same URL":
                raise ValueError(f"{role_j} lists {url_j} more than once")
            if role_i == role_j:
                raise ValueError(
                    f"{role_j} lists {url_i} and {url_j}, which are one engine ({why}): list "
                    "it once"
                )
            raise ValueError(
                f"{url_j} is in the pool and {url_i} in the {role_i} list, which are one engine "
                f"({why}): an engine is either dedicated or in the pool"
                if why != "the same URL"
                else f"{url_j} is in the pool and a prefill or decode list: an engine is either "
                "dedicated or in the pool"
            )
        return self

    # --- the pool ---
    @model_validator(mode="after")
    def _check_pool(self) -> ProxyConfig:
        if not self.pool:
            return self
        dedicated = {w.url for w in (*self.prefill, *self.decode)}
        shared = sorted(w.url for w in self.pool if w.url in dedicated)
        if shared:
            raise ValueError(
                f"{', '.join(shared)} is in the pool and a prefill or decode list: an engine is "
                "either dedicated or in the pool"
            )
        if not connector_class(self.connector).pool_engines:
            raise ValueError(
                f"a pool needs connector {' or '.join(pool_connectors())}: its engines swap "
                "prefill and decode per request (kv_role kv_both)"
            )
        if self.pool_mode == "colocated" and self.prefill:
            raise ValueError(
                "pool_mode colocated serves every request whole on one engine: it has no use for "
                "prefill workers (drop them, or use pool_mode adaptive)"
            )
        if self.conditional_disagg.enabled:
            raise ValueError(
                "with a pool, the pool planner decides which prompts are prefilled apart "
                "(pool_planner.min_prefill_tokens); turn conditional_disagg off"
            )
        return self

    @model_validator(mode="after")
    def _check_discovery(self) -> ProxyConfig:
        if self.discovery.source == "static":
            return self
        if self.workers_state_file:
            raise ValueError(
                f"discovery.source {self.discovery.source} keeps the workers in step with what "
                "it watches: drop workers_state_file"
            )
        if self.discovery.selectors.pool and not connector_class(self.connector).pool_engines:
            raise ValueError(
                f"discovery.selectors.pool: pool engines need connector "
                f"{' or '.join(pool_connectors())}"
            )
        single = connector_class(self.connector).single_proxy
        if self.discovery.leader is not None and single is not None:
            raise ValueError(
                f"connector {self.connector} cannot run as several replicas (discovery.leader): "
                f"{single}; run one replica, or use connector {' or '.join(replica_connectors())}"
            )
        return self

    @property
    def has_pool(self) -> bool:
        """Pool engines configured, or discovered by label (a pool placement either way)."""
        return bool(self.pool) or bool(self.discovery.selectors.pool)

    # --- the decoders' receivers (connector lmcache) ---
    @model_validator(mode="after")
    def _check_receivers(self) -> ProxyConfig:
        if any(w.lmcache is not None for w in self.prefill):
            raise ValueError("'lmcache' ports belong to decode workers, not prefill workers")
        connector_class(self.connector).receivers([(w.url, w.lmcache) for w in self.decode])
        return self

    @model_validator(mode="after")
    def _check_kv_events(self) -> ProxyConfig:
        """Every configured engine's event sockets, from the rule or `endpoints`, are valid."""
        if self.kv_events.enabled:
            for worker in (*self.prefill, *self.decode, *self.pool):
                self.kv_events.endpoint_for(worker.url)
        return self


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown key {err['loc'][-1]!r}"
        lines.append(f"  {where}: {message.removeprefix('Value error, ')}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> ProxyConfig:
    """Read the YAML file (if any), apply non-None overrides, and validate the result."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as stream:  # a stream: YAML's errors name the file
                loaded = yaml.safe_load(stream)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        data = loaded or {}
    for key, value in overrides.items():
        if value is None or value == [] or value == ():
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
