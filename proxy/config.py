"""Typed proxy configuration, validated once at start-up.

A YAML file gives the base; command-line flags override it. Unknown keys are rejected with a message
that names them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.control.admin.config import AdminConfig
from proxy.control.identity import duplicates
from proxy.engines.connectors.lmcache_config import LMCacheConfig, LMCacheReceiverConfig
from proxy.engines.connectors.registry import connector_class, pool_connectors

PolicyName = Literal["round_robin", "least_loaded", "load_aware", "prefix_aware"]
PoolMode = Literal["adaptive", "colocated"]
# what launchers/disagg.sh gives the proxy: the engines' UCX_CUDA_IPC_ENABLE_GET_ZCOPY
ENGINE_GET_ZCOPY_ENV = "PDPROXY_ENGINE_UCX_CUDA_IPC_ENABLE_GET_ZCOPY"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says what to change."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerConfig(_Model):
    """One vLLM instance, addressed by its OpenAI server's base URL."""

    url: str = Field(description="the engine's base URL, http://host:port (no /v1)")
    lmcache: LMCacheReceiverConfig | None = Field(
        None,
        description="connector lmcache, decoders only: this decoder's LMCache receiver; by "
        "default the URL's host and, for the i-th decoder, init port 7300+i and alloc port 7400+i",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_worker_url(value)


def check_worker_url(value: str) -> str:
    """An engine's base URL, without a trailing slash; ValueError saying what is wrong."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL such as http://127.0.0.1:8100")
    if parts.path not in ("", "/"):
        raise ValueError(f"{value!r}: give the server's base URL without a path (no /v1)")
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value.rstrip("/")


class TimeoutsConfig(_Model):
    """Seconds. Each one ends the request with a 504 (or an SSE error event once streaming)."""

    connect: float = Field(5.0, gt=0, description="TCP connect to an engine")
    prefill: float = Field(600.0, gt=0, description="whole prefill leg")
    decode_first_byte: float = Field(
        600.0,
        gt=0,
        description="decode leg until its first chunk (the whole answer when not streaming)",
    )
    decode_idle: float = Field(
        120.0, gt=0, description="longest gap between two streamed decode chunks"
    )


class HealthConfig(_Model):
    interval: float = Field(
        5.0, ge=0, description="seconds between active /health checks of every worker; 0 = off"
    )
    timeout: float = Field(5.0, gt=0, description="seconds one /health check may take")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open a breaker")
    cooldown: float = Field(10.0, gt=0, description="seconds an open breaker waits before a trial")
    stall_timeout: float = Field(
        60.0,
        ge=0,
        description="seconds a worker with legs waiting on it may complete nothing before it is "
        "taken out of rotation, whatever its /health says; 0 = off",
    )
    probe_on_start: bool = Field(
        False, description="run the admission probes on the configured workers at start-up"
    )


class FailoverConfig(_Model):
    prefill_retries: int = Field(2, ge=0, description="other prefillers tried after a failure")
    decode_retries: int = Field(1, ge=0, description="other decoders tried before the first byte")
    fallback_local_prefill: bool = Field(
        True, description="no prefiller available: let the decoder compute the prompt itself"
    )


class AdmissionConfig(_Model):
    max_concurrent: int = Field(0, ge=0, description="requests in flight at once; 0 = unlimited")
    max_queue: int = Field(1024, ge=0, description="requests waiting for a slot; beyond: 429")
    queue_timeout: float = Field(30.0, gt=0, description="longest wait for a slot; then 429")


class FanoutConfig(_Model):
    """Requests for several completions (a list of prompts, n > 1): one disaggregated
    sub-request per completion (see proxy.flow.fanout)."""

    max_batch_prompts: int = Field(
        1024, ge=1, description="completions one request may ask for (prompts x n); beyond: 400"
    )
    max_parallel: int = Field(
        8, ge=1, description="sub-requests of one request in flight at once; the rest wait"
    )


class AuthConfig(_Model):
    """Where keys come from: an environment variable (comma-separated) or a file (one per line)."""

    api_keys_env: str | None = Field(
        None, description="environment variable with the client keys for /v1/* (comma-separated)"
    )
    api_keys_file: str | None = Field(
        None, description="file with the client keys for /v1/* (one per line)"
    )
    admin_keys_env: str | None = Field(
        None,
        description="environment variable with the keys for /stats, /admin and /console "
        "(comma-separated)",
    )
    admin_keys_file: str | None = Field(
        None, description="file with the keys for /stats, /admin and /console (one per line)"
    )


class StatsConfig(_Model):
    interval: float = Field(
        5.0, ge=0, description="seconds between latency log blocks; 0 = off (--stats-interval)"
    )
    window: int = Field(10_000, ge=10, le=10_000_000, description="requests kept per statistic")
    timelines: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="recent request timelines kept for the console and /admin/requests",
    )


class RoutingConfig(_Model):
    """Tuning of the load- and cache-aware policies (see proxy.place.policies)."""

    prefix_chars: int = Field(32768, ge=0, description="prompt characters hashed for routing")
    prefix_block_chars: int = Field(256, ge=16, description="prefix_aware: bytes per block")
    balance_abs: int = Field(4, ge=0, description="prefix_aware: extra requests a hit may carry")
    balance_rel: float = Field(1.5, ge=1, description="prefix_aware: or this many times the least")
    waiting_weight: float = Field(2.0, ge=0, description="load_aware: weight of a waiting request")
    kv_high: float = Field(
        0.95, gt=0, le=1, description="load_aware: KV usage that avoids a worker"
    )
    scrape_interval: float = Field(
        0.25, ge=0, description="seconds between /metrics scrapes for load_aware; 0 = off"
    )
    scrape_timeout: float = Field(1.0, gt=0, description="seconds one scrape may take")


class DisaggConfig(_Model):
    """Conditional disaggregation: prompts with fewer uncached tokens go straight to the decoder."""

    enabled: bool = Field(
        False, description="let short prompts skip the prefiller (connector nixl, no pool)"
    )
    min_prefill_tokens: int = Field(
        512, ge=1, description="prompt tokens not cached on the decoder below which it prefills"
    )
    tokenize_timeout: float = Field(2.0, gt=0, description="seconds for the decoder's /tokenize")


class PoolPlannerConfig(_Model):
    """The pool's planner and its ratio controller (see proxy.place.pool_planner and
    proxy.control.ratio). Capacities are one engine's; seconds are wall-clock seconds of the
    engines' time."""

    min_prefill_tokens: int = Field(
        512, ge=1, description="uncached prompt tokens below which one engine serves the request"
    )
    local_max_tokens: int = Field(
        4, ge=0, description="max_tokens up to which a long prompt is answered where it is computed"
    )
    prefill_tokens_per_second: float = Field(
        40000.0, gt=0, description="prompt tokens one engine computes per second"
    )
    max_prefill_wait: float = Field(
        0.5,
        gt=0,
        description="seconds of prompt work queued on the best prefill engine beyond which a "
        "long prompt is computed on its decoder (when that one has less queued; prefill_busy)",
    )
    decode_streams: int = Field(
        256, ge=1, description="answers one engine generates at once (its --max-num-seqs)"
    )
    target_utilization: float = Field(
        0.8, gt=0, le=1, description="share of an engine's capacity the controller plans to use"
    )
    decode_prefill_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of a decode-side engine's time the controller lets prompts take",
    )
    window: float = Field(30.0, gt=0, description="seconds of load the controller weighs")
    interval: float = Field(1.0, gt=0, description="seconds between the controller's decisions")
    hysteresis: float = Field(
        0.15, ge=0, description="relative gain a new ratio must promise before it is taken"
    )
    hold: int = Field(3, ge=1, description="decisions in a row that must agree before a change")
    min_dwell: float = Field(
        5.0,
        ge=0,
        description="seconds an engine keeps its lean at least (not when over capacity)",
    )
    tokenize_timeout: float = Field(
        2.0,
        gt=0,
        description="seconds for an engine's /tokenize (without an answer the prompt size is "
        "estimated)",
    )


class KvHealthConfig(_Model):
    """KV-transfer health from the decoders' own transfer metrics (see proxy.control.kvhealth)."""

    enabled: bool = Field(
        True, description="watch the decoders' NIXL pull bandwidth (connector nixl)"
    )
    interval: float = Field(5.0, gt=0, description="seconds between the decoders' scrapes")
    window: float = Field(60.0, gt=0, description="seconds of transfers judged together")
    min_bandwidth: float = Field(
        2e9, ge=0, description="bytes per second under which a decoder's pulls are slow"
    )
    min_bytes: float = Field(
        64 * 2**20, ge=0, description="bytes that must move in the window before judging"
    )
    warn_interval: float = Field(60.0, gt=0, description="seconds between repeated warnings")
    min_pulls: int = Field(
        8, ge=1, description="pulls that must be in the window (past warm-up) before judging"
    )
    warmup_pulls: int = Field(
        8,
        ge=0,
        description="each decoder's first pulls (as its engine counts them), left out: the "
        "first pulls of a fresh topology register memory and connect, and are slow",
    )
    engine_get_zcopy: str | None = Field(
        default_factory=lambda: os.environ.get(ENGINE_GET_ZCOPY_ENV) or None,
        description="UCX_CUDA_IPC_ENABLE_GET_ZCOPY as the engines have it, when known, so that "
        "a slow-KV warning does not recommend what is already set; default: the environment "
        f"variable {ENGINE_GET_ZCOPY_ENV}, which launchers/disagg.sh sets to what it gave the "
        "engines",
    )


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
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
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
    # connector lmcache: the notification socket and its deadline
    # (see proxy.engines.connectors.lmcache_config)
    lmcache: LMCacheConfig = Field(default_factory=LMCacheConfig)
    # run-time workers: the admin API, its probes and allow-list (see proxy.control.admin.config)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    workers_state_file: str | None = Field(
        None, description="the workers after each change, read back at start-up"
    )

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
            if not workers and not self.pool and role != "pool":
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

    # --- the decoders' receivers (connector lmcache) ---
    @model_validator(mode="after")
    def _check_receivers(self) -> ProxyConfig:
        if any(w.lmcache is not None for w in self.prefill):
            raise ValueError("'lmcache' ports belong to decode workers, not prefill workers")
        connector_class(self.connector).receivers([(w.url, w.lmcache) for w in self.decode])
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
