"""Configuration of where the workers come from (`discovery:` in the proxy's YAML).

`source: static` (the default): the configured lists, or the workers state file, and the admin
API. `source: kubernetes`: besides those, the pods that one label selector per role names in
one namespace (proxy.control.membership.kubernetes). Kept apart from `proxy.config`, which only
names this type.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.control.membership.selectors import parse_selector


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selectors(_Model):
    prefill: str | None = Field(None, description="label selector of the prefill pods")
    decode: str | None = Field(None, description="label selector of the decode pods")
    pool: str | None = Field(None, description="label selector of the pool (kv_both) pods")

    @field_validator("prefill", "decode", "pool")
    @classmethod
    def _check(cls, value: str | None) -> str | None:
        if value is not None:
            parse_selector(value)  # raises ValueError naming the bad term
        return value


class LeaderConfig(_Model):
    """Several proxy replicas that decide as one (proxy.control.membership.leader, .shared)."""

    lease_name: str = Field(
        "pdproxy-leader", description="the coordination.k8s.io Lease the replicas contend for"
    )
    lease_duration: float = Field(
        15.0,
        gt=0,
        description="seconds a holder that stopped renewing keeps the Lease; another replica "
        "takes it over after this",
    )
    renew_interval: float = Field(
        5.0,
        gt=0,
        description="seconds between the holder's renewals, and between every replica's reads "
        "of the shared decisions",
    )
    identity: str | None = Field(
        None,
        description="this replica's holderIdentity; default: the POD_NAME environment variable "
        "(the downward API), else the host name",
    )
    effective_delay: float | None = Field(
        None,
        gt=0,
        description="seconds from a lean decision (the leader's, or a pin) to the instant every "
        "replica applies it, by its own clock; longer than renew_interval, so that every "
        "replica has read it by then; default: renew_interval + 1",
    )
    peers: str | None = Field(
        None,
        description="label selector of the proxy replicas' pods: the leader reads their placed "
        "prompt tokens, so that its pool controller sees the whole fleet's prompt load; unset: "
        "it sees its own share only",
    )
    configmap: str = Field(
        "pdproxy-decisions",
        description="the ConfigMap the leader publishes the pool's leans, pins and drains in",
    )

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: str | None) -> str | None:
        if value is not None:
            parse_selector(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> LeaderConfig:
        if self.renew_interval >= self.lease_duration:
            raise ValueError(
                "leader.renew_interval must be shorter than leader.lease_duration (the holder "
                "renews several times before another may take the Lease)"
            )
        if self.effective_delay is not None and self.effective_delay <= self.renew_interval:
            raise ValueError(
                "leader.effective_delay must be longer than leader.renew_interval (every "
                "replica reads a decision once per renew_interval and must have it before it "
                "takes effect)"
            )
        return self


class DiscoveryConfig(_Model):
    source: Literal["static", "kubernetes"] = Field(
        "static",
        description="static: the configured workers and the admin API; kubernetes: also the "
        "pods the selectors name, each probed before it serves (README: On Kubernetes)",
    )
    namespace: str | None = Field(
        None,
        description="where the pods are; default: the proxy's own namespace (in a cluster) or "
        "the kubeconfig context's",
    )
    kubeconfig: str | None = Field(
        None, description="a kubeconfig file; default: the in-cluster service account"
    )
    selectors: Selectors = Field(default_factory=Selectors)
    port_name: str = Field("http", description="the named container port of the engine's HTTP API")
    port_annotation: str = Field(
        "pdproxy.io/port", description="pod annotation giving the engine's port (over port_name)"
    )
    side_channel_annotation: str = Field(
        "pdproxy.io/nixl-side-channel-port",
        description="pod annotation giving its NIXL side-channel port (shown, not dialled)",
    )
    lmcache_annotation: str = Field(
        "pdproxy.io/lmcache-ports",
        description="decode pod annotation giving its LMCache receiver as 'INIT/ALLOC' ports, "
        "one pair per TP rank, comma-separated",
    )
    probe_retry: float = Field(
        2.0, gt=0, description="seconds before a pod that failed its probes is probed again"
    )
    probe_retry_max: float = Field(
        60.0, gt=0, description="the longest wait between probes (the wait doubles each time)"
    )
    api_retry: float = Field(
        1.0, gt=0, description="seconds before the API server is asked again after a failure"
    )
    api_retry_max: float = Field(
        30.0, gt=0, description="the longest wait between attempts to reach the API server"
    )
    watch_timeout: int = Field(
        300, ge=1, description="seconds the API server holds one watch open before it is renewed"
    )
    leader: LeaderConfig | None = Field(
        None,
        description="several replicas: one holds a Lease and decides the pool's leans, pins "
        "and drains for all (README: On Kubernetes); unset: this proxy decides alone",
    )

    @model_validator(mode="after")
    def _check(self) -> DiscoveryConfig:
        chosen = [s for s in (self.selectors.prefill, self.selectors.decode, self.selectors.pool)]
        if self.source == "kubernetes" and not any(chosen):
            raise ValueError(
                "source kubernetes needs at least one of selectors.prefill, selectors.decode, "
                "selectors.pool"
            )
        if self.leader is not None and self.source != "kubernetes":
            raise ValueError("discovery.leader needs source kubernetes (the Lease lives there)")
        if self.probe_retry_max < self.probe_retry or self.api_retry_max < self.api_retry:
            raise ValueError("a retry's maximum must not be shorter than its first wait")
        return self
