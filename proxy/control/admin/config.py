"""Configuration of the admin API and of admission probes (`admin:` in the proxy's YAML).

Kept apart from `proxy.config`, which only names this type.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.control.admin.hosts import parse_entry


class AdminConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_worker_hosts: tuple[str, ...] | None = Field(
        None,
        description="host names or CIDRs a worker added at run time may have; default: the "
        "configured workers' hosts and loopback",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve /admin and /console without admin keys on a non-loopback address",
    )
    probe_timeout: float = Field(30.0, gt=0, description="seconds each admission probe may take")
    probe_pull_wait: float = Field(
        10.0,
        gt=0,
        description="seconds a NIXL decoder's probe pull may take to show in its /metrics",
    )
    probe_words: int | None = Field(
        None,
        ge=4,
        le=100_000,
        description="words in the probe prompt; default 48, or 400 with connector lmcache (a "
        "prompt must fill one LMCache chunk for its transfer to be reported)",
    )
    recent_removed: int = Field(
        32, ge=0, le=10_000, description="removed workers still shown by GET /admin/workers/{id}"
    )

    @field_validator("allowed_worker_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for entry in value or ():
            parse_entry(entry)  # raises ValueError naming the bad entry
        return value
