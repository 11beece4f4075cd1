"""Choosing a worker: pure functions of a snapshot of the workers and the request.

A policy never does I/O and never mutates a worker; it returns the index of its choice, or None when
no worker is available. One policy per module; `make_policy` is the only place that maps a config
name to a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.workers import WorkerState


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy may know about the request being placed."""

    request_id: str
    prompt_chars: int


class Policy(Protocol):
    name: str

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        """Index into `workers` of the chosen one, or None if none is available."""
        ...


def make_policy(name: str) -> Policy:
    from proxy.policies.least_loaded import LeastLoaded
    from proxy.policies.round_robin import RoundRobin

    policies: dict[str, type[Policy]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(policies)}") from None
