"""Workers (engine instances) and their live load, as the proxy sees it.

The pool owns the counters; policies only read them. Every increment has its decrement in a
`finally` (see `WorkerPool.track`), so counters return to zero on every path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

Role = Literal["prefill", "decode"]


class Health(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class WorkerState(Protocol):
    """What a policy may read about a worker."""

    @property
    def index(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def inflight_chars(self) -> int: ...
    @property
    def available(self) -> bool: ...


@dataclass(eq=False)
class Worker:
    role: Role
    index: int
    url: str
    inflight: int = 0
    inflight_chars: int = 0
    health: Health = Health.UNKNOWN
    last_error: str | None = None
    requests_total: int = 0
    failures_total: int = 0

    @property
    def available(self) -> bool:
        return self.health is not Health.UNHEALTHY

    def describe(self) -> dict[str, object]:
        return {
            "url": self.url,
            "health": self.health.value,
            "inflight": self.inflight,
            "inflight_chars": self.inflight_chars,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "last_error": self.last_error,
        }


@dataclass(eq=False)
class WorkerPool:
    role: Role
    workers: Sequence[Worker] = field(default_factory=tuple)

    @classmethod
    def from_urls(cls, role: Role, urls: Sequence[str]) -> WorkerPool:
        return cls(role, tuple(Worker(role, i, url) for i, url in enumerate(urls)))

    @contextmanager
    def track(self, worker: Worker, chars: int) -> Iterator[Worker]:
        """Count one in-flight request of `chars` prompt characters on `worker` while inside."""
        worker.inflight += 1
        worker.inflight_chars += chars
        worker.requests_total += 1
        try:
            yield worker
        finally:
            worker.inflight -= 1
            worker.inflight_chars -= chars

    def record_failure(self, worker: Worker, reason: str) -> None:
        worker.failures_total += 1
        worker.last_error = reason

    def __repr__(self) -> str:
        loads = ", ".join(f"{w.url}:{w.inflight}" for w in self.workers)
        return f"<WorkerPool {self.role} [{loads}]>"
