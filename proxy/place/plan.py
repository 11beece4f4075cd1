"""Where a request goes: the plan the request path carries out, and the planners that make it.

A `Plan` names the worker that answers (`decoder`) and, when the prompt is computed elsewhere
first, the worker that prefills it (`prefiller`). A planner only decides; the request path
(proxy.handler) executes the plan through the connector and keeps its own failover: a failed
prefill is retried on `Planner.pick_prefill`'s choice, a failed decode on `pick_decode`'s.

Two planners:

* `RouterPlanner`: dedicated prefillers and decoders, each role chosen by its policy
  (proxy.policies); whether the prompt gets a prefill leg at all is left to the request path
  (`Plan.prefill` None: conditional disaggregation, prompt logprobs, beam search).
* `proxy.place.pool_planner.PoolPlanner`: a pool of engines that do either (NIXL kv_both), beside
  any dedicated ones; it decides everything per request (`Plan.prefill` "local" or "remote").
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from proxy.control.workers import Lease, Worker, WorkerPool
from proxy.errors import NoWorkerAvailable
from proxy.place.policies import Policy, RequestInfo
from proxy.request import ClientRequest

PrefillWhere = Literal["local", "remote"]


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's placement. `prefill` "local": `decoder` computes the prompt itself (no KV
    moves); "remote": `prefiller` computes it and `decoder` pulls the KV; None: not decided by
    the planner (the request path asks conditional disaggregation, else prefills remotely on
    the prefill policy's choice). `reason` says why, `tokens` is the prompt's uncached token
    count when the planner counted it."""

    decoder: Worker
    prefiller: Worker | None = None
    prefill: PrefillWhere | None = None
    reason: str | None = None
    tokens: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "prefill": self.prefill,
            "reason": self.reason,
            "prefiller": None if self.prefiller is None else self.prefiller.id,
            "decoder": self.decoder.id,
            "tokens": self.tokens,
        }


class Planner(Protocol):
    name: str

    async def plan(self, request: ClientRequest, info: RequestInfo) -> Plan:
        """The plan for one request; NoWorkerAvailable when none can be made. Nothing is
        awaited after the choice, so the request path tracks the chosen workers before any
        other request is placed."""
        ...

    def pick_prefill(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another worker to prefill on after a failure (None: none left)."""
        ...

    def pick_decode(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another worker to decode on after a failure, or to serve vLLM's other endpoints."""
        ...

    def forget(self, worker: Worker) -> None:
        """`worker` left: drop whatever the planner kept about it."""
        ...


@dataclass
class Router:
    """Pairs each worker pool with its policy; the only place the policies meet worker state.
    `pool` holds the pool's engines (empty without one), which the pool planner places."""

    prefill: WorkerPool
    decode: WorkerPool
    prefill_policy: Policy
    decode_policy: Policy
    pool: WorkerPool | None = None

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = WorkerPool("pool")

    @property
    def pools(self) -> tuple[WorkerPool, WorkerPool, WorkerPool]:
        assert self.pool is not None
        return self.prefill, self.decode, self.pool

    def pool_of(self, worker: Worker) -> WorkerPool:
        return next(p for p in self.pools if p.role == worker.role)

    def track(
        self, worker: Worker, chars: int, prefill_tokens: int = 0
    ) -> AbstractContextManager[Lease]:
        """WorkerPool.track on the worker's own pool (a context manager giving a Lease)."""
        return self.pool_of(worker).track(worker, chars, prefill_tokens)

    def pick_prefill(self, info: RequestInfo, exclude: Sequence[Worker] = ()) -> Worker | None:
        return self._pick(self.prefill, self.prefill_policy, info, exclude)

    def pick_decode(self, info: RequestInfo, exclude: Sequence[Worker] = ()) -> Worker | None:
        return self._pick(self.decode, self.decode_policy, info, exclude)

    def forget(self, worker: Worker) -> None:
        """`worker` left its pool: its policy drops what it kept about it."""
        if worker.role == "prefill":
            self.prefill_policy.forget(worker.url)
        elif worker.role == "decode":
            self.decode_policy.forget(worker.url)

    @staticmethod
    def _pick(
        pool: WorkerPool, policy: Policy, info: RequestInfo, exclude: Sequence[Worker]
    ) -> Worker | None:
        pool.refresh()
        workers = [w for w in pool.workers if w not in exclude] if exclude else pool.workers
        index = policy.select(workers, info)
        return None if index is None else workers[index]


class RouterPlanner:
    """Dedicated prefillers and decoders: the decode policy's choice answers; the prefill leg
    is the request path's to decide (Plan.prefill None)."""

    name = "router"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def plan(self, request: ClientRequest, info: RequestInfo) -> Plan:
        decoder = self.router.pick_decode(info)
        if decoder is None:
            raise NoWorkerAvailable("no decode worker is available")
        return Plan(decoder)

    def pick_prefill(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        return self.router.pick_prefill(info, exclude)

    def pick_decode(self, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        return self.router.pick_decode(info, exclude)

    def forget(self, worker: Worker) -> None:
        self.router.forget(worker)
