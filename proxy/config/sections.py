"""The configuration's sections: one typed model per concern (timeouts, health, failover,
admission, fan-out, auth, stats, routing, conditional disaggregation, the pool's planner, KV
health) and the workers' entries. proxy.config.model assembles them into ProxyConfig."""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig

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
        description="decode leg until its first chunk (a non-streamed answer that cannot migrate: "
        "the whole answer)",
    )
    decode_idle: float = Field(
        120.0,
        gt=0,
        description="longest gap between two decode chunks (streamed answers, and non-streamed "
        "ones read as a stream so that they can migrate)",
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
    migrations: int = Field(
        2,
        ge=0,
        description="times a stream whose decoder failed mid-answer continues on another decoder "
        "(0: it ends with an error)",
    )
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


class KvEventsEndpoint(_Model):
    """One engine's KV-event sockets (its vLLM --kv-events-config endpoints, as reachable)."""

    publisher: str = Field(description="its PUB socket, tcp://host:port")
    replay: str | None = Field(None, description="its replay (ROUTER) socket, tcp://host:port")
    bind: bool = Field(
        True,
        description="the proxy binds `publisher` and the engine connects to it (vLLM does so "
        "for an endpoint without a wildcard); one proxy process per engine then; false: the "
        "engine binds (tcp://*:port) and the proxy connects",
    )

    @field_validator("publisher", "replay")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise ValueError(f"{value!r} is not a ZMQ endpoint such as tcp://127.0.0.1:8100")
        return value


class KvEventsConfig(_Model):
    """The exact prefix index from the engines' KV-cache events (proxy.control.kvevents)."""

    enabled: bool = Field(
        False,
        description="subscribe to every engine's KV-cache events (--kv-events); an engine "
        "without them keeps the estimate",
    )
    port_offset: int = Field(
        1000,
        ge=-65535,
        le=65535,
        description="an engine's event socket, when `endpoints` does not name it: the same host, "
        "its HTTP port plus this (launchers/disagg.sh's rule)",
    )
    replay_port_offset: int | None = Field(
        1050, ge=-65535, le=65535, description="its replay socket likewise; null: none"
    )
    endpoints: dict[str, KvEventsEndpoint] = Field(
        default_factory=dict, description="engine base URL -> its sockets, overriding the rule"
    )
    bind: bool = Field(
        True,
        description="for the rule: the proxy binds the event sockets and the engines connect "
        "(launchers/disagg.sh gives the engines tcp://HOST:port); false: the engines bind "
        "(tcp://*:port) and any number of proxy processes connect",
    )
    topic: str = Field("", description="the engines' kv-events topic")
    replay_timeout: float = Field(5.0, gt=0, description="seconds a replay may take")

    @field_validator("endpoints")
    @classmethod
    def _check_urls(cls, value: dict[str, KvEventsEndpoint]) -> dict[str, KvEventsEndpoint]:
        return {check_worker_url(url): endpoint for url, endpoint in value.items()}

    def endpoint_for(self, url: str) -> KvEventsEndpoint:
        """The sockets of the engine at `url`; ValueError if the rule gives no valid port."""
        named = self.endpoints.get(url)
        if named is not None:
            return named
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host

        def socket(offset: int) -> str:
            if not 0 < port + offset < 65536:
                raise ValueError(f"{url}: port {port} + offset {offset} is not a port")
            return f"tcp://{host}:{port + offset}"

        replay = None if self.replay_port_offset is None else socket(self.replay_port_offset)
        return KvEventsEndpoint(publisher=socket(self.port_offset), replay=replay, bind=self.bind)
