"""The interface of a policy and what it may know of a request (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.control.workers import WorkerState


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy may know about the request being placed."""

    request_id: str
    prompt_chars: int
    prefix: str = ""  # the prompt's first characters as rendered (proxy.place.prefix)
    blocks: tuple[int, ...] = ()  # the prefix's chained block hashes (prefix_blocks), once
    # exact: of the prompt, the leading tokens each engine with KV events holds (by URL;
    # proxy.place.kvindex), once its token ids are known; None when they are not
    cached: Mapping[str, int] | None = None


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
