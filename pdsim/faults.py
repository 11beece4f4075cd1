"""Injected faults: what the next generation requests should suffer.

A fault set applies to the next ``count`` generation requests (``/v1/completions`` and
``/v1/chat/completions``), or to all of them until replaced when ``count`` is null.
``unhealthy``, ``side_channel_error``, ``kv_xfer_gbps`` and ``kv_events_unsent`` are states, not
per-request faults: they hold until the fault set is replaced or reset.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Faults(BaseModel):
    """One fault set, as posted to ``POST /_sim/faults`` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int | None = Field(default=None, ge=1)
    error_status: int | None = Field(default=None, ge=400, le=599)
    error_message: str = "Injected fault"
    stall_seconds: float = Field(default=0.0, ge=0.0)
    # with stall_seconds: stall after this many stream chunks instead of before answering
    stall_after_chunks: int | None = Field(default=None, ge=0)
    drop_after_chunks: int | None = Field(default=None, ge=0)
    # the whole engine dies (SIGKILL of its own process) after this many stream chunks
    exit_after_chunks: int | None = Field(default=None, ge=0)
    error_event_after_chunks: int | None = Field(default=None, ge=0)
    garbage_body: bool = False
    truncate_body: bool = False
    unhealthy: bool = False
    side_channel_error: bool = False
    # a decoder's KV pulls move at this many GB/s, as over TCP (vLLM's NIXL metrics show it)
    kv_xfer_gbps: float | None = Field(default=None, gt=0)
    # KV-event batches are numbered and kept for replay but not sent, as batches dropped at
    # the publisher's high-water mark are: subscribers see a gap in the sequence numbers
    kv_events_unsent: bool = False

    @property
    def per_request(self) -> bool:
        """Whether any fault applies to generation requests."""
        return bool(
            self.error_status is not None
            or self.stall_seconds > 0
            or self.drop_after_chunks is not None
            or self.exit_after_chunks is not None
            or self.error_event_after_chunks is not None
            or self.garbage_body
            or self.truncate_body
        )


class FaultState:
    """The current fault set and how many requests it still applies to."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        self._remaining = faults.count

    @property
    def current(self) -> Faults:
        return self._faults

    def replace(self, faults: Faults) -> None:
        self._faults = faults
        self._remaining = faults.count

    def take(self) -> Faults | None:
        """The faults the next generation request suffers, consuming one use of ``count``."""
        faults = self._faults
        if not faults.per_request:
            return None
        if self._remaining is not None:
            if self._remaining <= 0:
                return None
            self._remaining -= 1
        return faults
