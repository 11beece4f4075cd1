"""The one planner: every request's whole plan, in every topology, counted with its reason.

    info   the request as the policies see it: its prefix and the prefix's block hashes, once
    plan   the placement names the engine that counts the prompt's tokens, if the decision
           needs the exact count (the only await); then, from a snapshot and with nothing
           awaited, the placement decides the whole plan; the prefix index notes where the
           prompt goes, and `pdproxy_disagg_decisions_total{decision,reason}` counts it
    retry  after a failed leg: the same plan with another worker for that leg, or None
    migrate  after a decoder failed mid-stream: the continuation's plan on another decoder

Nothing is awaited between the snapshot and the return, so the request path tracks the chosen
workers before any other request is placed. Token counts go through `count`, which the app
factory wires to the engines' /tokenize (proxy.engines.tokenize).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from proxy.control.workers import Worker
from proxy.place.kvindex import KvIndex
from proxy.place.plan import Leg, Placement, Plan
from proxy.place.policies import RequestInfo
from proxy.place.prefix import PrefixIndex, prefix_blocks, prompt_prefix
from proxy.request import ClientRequest

# the prompt's token count, or its token ids (then engines with KV events are looked up exactly)
TokenCount = Callable[[ClientRequest, Worker], Awaitable[int | Sequence[int] | None]]


@dataclass
class Planner:
    placement: Placement
    count: TokenCount
    index: PrefixIndex
    decisions: Counter  # pdproxy_disagg_decisions_total
    prefix_chars: int = 0  # prompt characters hashed (0: nothing reads them)
    block_chars: int = 256
    kv_index: KvIndex = dataclasses.field(default_factory=KvIndex)  # fed by the control plane

    @property
    def name(self) -> str:
        return self.placement.name

    def info(self, request: ClientRequest) -> RequestInfo:
        if not self.prefix_chars:
            return RequestInfo(request.request_id, request.prompt_chars)
        prefix = prompt_prefix(request.path, request.body, self.prefix_chars)
        blocks = tuple(prefix_blocks(prefix, self.block_chars))
        return RequestInfo(request.request_id, request.prompt_chars, prefix, blocks)

    async def plan(self, request: ClientRequest, info: RequestInfo) -> Plan:
        """The whole plan; NoWorkerAvailable when no worker can answer."""
        matched = self.index.matched(info.blocks) if info.blocks else {}
        counter = self.placement.tokenizer(request, info, matched)
        counted = None if counter is None else await self.count(request, counter)
        tokens, info = self.exact(counted, info)
        if counter is not None and info.blocks:  # the index may have moved meanwhile
            matched = self.index.matched(info.blocks)
        plan = self.placement.place(request, info, matched, tokens)
        if info.blocks:  # where the prompt's prefix will be cached
            self.index.record(info.blocks, plan.decoder.url)
            if plan.prefiller is not None:
                self.index.record(info.blocks, plan.prefiller.url)
        self.decisions.labels(plan.prefill, plan.reason).inc()
        return plan

    def exact(
        self, counted: int | Sequence[int] | None, info: RequestInfo
    ) -> tuple[int | None, RequestInfo]:
        """The prompt's token count, and `info` with what each engine with events holds of it
        when its token ids are known."""
        if counted is None or isinstance(counted, int):
            return counted, info
        if self.kv_index.engines:
            info = dataclasses.replace(
                info, cached=self.kv_index.cached(counted, list(self.kv_index.engines))
            )
        return len(counted), info

    def retry(
        self, plan: Plan, leg: Leg, info: RequestInfo, exclude: Sequence[Worker]
    ) -> Plan | None:
        """`plan` with another worker for `leg` (none of `exclude`), or None when none is left."""
        worker = self.placement.another(leg, info, exclude)
        if worker is None:
            return None
        if leg == "prefill":
            return dataclasses.replace(plan, prefiller=worker)
        return dataclasses.replace(plan, decoder=worker)

    def migrate(self, plan: Plan, info: RequestInfo, exclude: Sequence[Worker]) -> Plan | None:
        """The plan of a stream's continuation after its decoder failed mid-answer: another
        decoder (none of `exclude`), the prompt computed where `plan` computes it (its
        prefiller, whose own failover still applies, or the new decoder); None when no
        decoder is left."""
        worker = self.placement.another("decode", info, exclude)
        if worker is None:
            return None
        return dataclasses.replace(plan, decoder=worker, reason="migration", tokens=None)

    def another(self, leg: Leg, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """A worker for `leg` outside any plan (vLLM's other endpoints, passed through)."""
        return self.placement.another(leg, info, exclude)

    def forget(self, worker: Worker) -> None:
        """`worker` left: its prefix ownership and whatever the placement kept go with it."""
        self.index.forget(worker.url)
        self.placement.forget(worker)
