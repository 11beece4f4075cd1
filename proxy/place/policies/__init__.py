"""Choosing a worker: pure functions of a snapshot of the workers and the request.

A policy never does I/O and never mutates a worker; it returns the index of its choice, or None when
no worker is available. Workers come and go between two choices (proxy.registry): a policy's own
state is keyed by what stays true of a worker (its URL), and `forget` drops it when one leaves.
One policy per module; `make_policy` is the only place that maps a config name to a class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.control.workers import WorkerState
from proxy.place.prefix import PrefixIndex


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy may know about the request being placed."""

    request_id: str
    prompt_chars: int
    prefix: str = ""  # the prompt's first characters as rendered (proxy.place.prefix)
    blocks: tuple[int, ...] = ()  # the prefix's chained block hashes (prefix_blocks), once


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """Tuning of the policies that have any; defaults suit the shipped configs."""

    prefix_block_chars: int = 256  # prefix_aware: characters per hashed block
    balance_abs: int = 4  # prefix_aware: a cache hit may be this many requests above the least
    balance_rel: float = 1.5  # ... and this many times the least loaded worker's requests
    waiting_weight: float = 2.0  # load_aware: a waiting request counts this many running ones
    kv_high: float = 0.95  # load_aware: a KV cache this full is chosen only if all are


class Policy(Protocol):
    name: str

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        """Index into `workers` of the chosen one, or None if none is available."""
        ...

    def forget(self, url: str) -> None:
        """The worker at `url` left the pool: drop whatever the policy remembers of it."""
        ...


def make_policy(
    name: str, options: PolicyOptions | None = None, index: PrefixIndex | None = None
) -> Policy:
    """The policy `name`; `index`: the proxy's one prefix index, which prefix_aware shares."""
    from proxy.place.policies.least_loaded import LeastLoaded
    from proxy.place.policies.load_aware import LoadAware
    from proxy.place.policies.prefix_aware import PrefixAware
    from proxy.place.policies.round_robin import RoundRobin

    opts = options or PolicyOptions()
    policies: dict[str, Callable[[], Policy]] = {
        "round_robin": RoundRobin,
        "least_loaded": LeastLoaded,
        "load_aware": lambda: LoadAware(opts.waiting_weight, opts.kv_high),
        "prefix_aware": lambda: PrefixAware(
            opts.balance_abs, opts.balance_rel, opts.waiting_weight, index
        ),
    }
    try:
        return policies[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(policies)}") from None
