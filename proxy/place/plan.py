"""What the request path carries out: one request's whole placement, and the interface of the
placements that make it (proxy.place.planner runs them).

A `Plan` always says where the prompt is computed: "local" (the decoder computes it, no KV
moves) or "remote" (`prefiller` computes it and the KV moves to `decoder`), and why. The request
path carries a plan out as it is; when a leg fails it asks the planner again for a replacement
(`Planner.retry`), it never completes or rewrites a plan itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from proxy.control.workers import Worker
from proxy.place.policies import RequestInfo
from proxy.request import ClientRequest

PrefillWhere = Literal["local", "remote"]
Leg = Literal["prefill", "decode"]
Matched = dict[str, int]  # engine URL -> leading prefix blocks of the prompt it holds


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's placement. `prefill` "local": `decoder` computes the prompt itself;
    "remote": `prefiller` computes it and `decoder` receives the KV (`prefiller` None: the
    prompt should be computed remotely but no prefiller is available now; the request path's
    failover takes over). `reason` says why (the `reason` label of
    `pdproxy_disagg_decisions_total`); `tokens` is the prompt's token count when the planner
    counted it."""

    decoder: Worker
    prefill: PrefillWhere
    reason: str
    prefiller: Worker | None = None
    tokens: int | None = None

    @property
    def local(self) -> bool:
        return self.prefill == "local"

    def describe(self) -> dict[str, Any]:
        return {
            "prefill": self.prefill,
            "reason": self.reason,
            "prefiller": None if self.prefiller is None else self.prefiller.id,
            "decoder": self.decoder.id,
            "tokens": self.tokens,
        }


class Placement(Protocol):
    """How one kind of topology places requests: dedicated roles (proxy.place.dedicated) or a
    pool beside them (proxy.place.pooled). Every method is synchronous and does no I/O."""

    name: ClassVar[str]

    def tokenizer(
        self, request: ClientRequest, info: RequestInfo, matched: Matched
    ) -> Worker | None:
        """The engine whose /tokenize counts this prompt, when the decision needs the exact
        count; None when it does not. `matched`: how many of the prompt's leading prefix
        blocks each engine (by URL) holds, as far as the proxy knows."""
        ...

    def place(
        self, request: ClientRequest, info: RequestInfo, matched: Matched, tokens: int | None
    ) -> Plan:
        """The whole plan from a snapshot of the workers (`tokens`: the exact count, if asked
        for and known); NoWorkerAvailable when no worker can answer."""
        ...

    def another(self, leg: Leg, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another worker for `leg` after a failure (None: none left)."""
        ...

    def forget(self, worker: Worker) -> None:
        """`worker` left: drop whatever the placement kept about it."""
        ...
