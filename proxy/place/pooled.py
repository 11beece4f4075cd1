"""Placement with a pool: engines that prefill for others and decode (NIXL kv_both), beside
any dedicated prefillers and decoders. A snapshot of every routed engine (`EngineView`s, each
with its lean) goes to the pure plan (proxy.place.pool), which decides everything.

In adaptive mode the prompt's exact token count comes from the least loaded decode-capable
engine's /tokenize; in colocated mode there is no count: every request goes whole to the
decode-capable engine with the least load, its size estimated from its characters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from proxy.control.workers import Lean, Worker
from proxy.errors import NoWorkerAvailable
from proxy.place.plan import Leg, Matched, Plan
from proxy.place.policies import RequestInfo
from proxy.place.policies.load_aware import estimated_load
from proxy.place.pool import EngineView, Job, PoolMode, Rules, best_decoder, best_prefiller
from proxy.place.pool import plan as decide
from proxy.place.prefix import cached_tokens
from proxy.place.router import Router
from proxy.request import ClientRequest

CHARS_PER_TOKEN = 4  # a prompt's size when no engine counted it (English text, roughly)
# plans whose prompt wants computing on the prefill side (where one leans so)
PREFILL_SIDE_REASONS = frozenset(
    {"long", "no_prefiller", "slow_kv", "single_engine", "short_output", "prefill_busy"}
)

# what the pool's controller sizes the two sides for: (prompt tokens computed, on the prefill
# side?) of each placed request
PromptSink = Callable[[int, bool], None]


@dataclass
class PoolPlacement:
    router: Router
    block_chars: int
    rules: Rules
    waiting_weight: float = 2.0
    kv_high: float = 0.95
    prompts: PromptSink | None = None  # the pool controller's measure of placed prompts
    name: ClassVar[str] = "pool"

    @property
    def mode(self) -> PoolMode:
        return self.rules.mode

    def routed(self) -> list[Worker]:
        """Every engine a plan may name: dedicated prefillers and decoders, then the pool's."""
        out: list[Worker] = []
        for pool in self.router.pools:
            pool.refresh()
            out += pool.workers
        return out

    def view(self, worker: Worker, cached: int = 0) -> EngineView:
        load = worker.engine_load
        lean: Lean = "prefill" if worker.role == "prefill" else "decode"
        if worker.role == "pool" and worker.lean is not None:
            lean = worker.lean
        return EngineView(
            role=worker.role,
            lean=lean,
            available=worker.available,
            load=estimated_load(worker, self.waiting_weight),
            prefill_tokens=worker.prefill_tokens,
            decode_streams=worker.decode_streams,
            kv_full=load is not None and load.kv_usage >= self.kv_high,
            slow_kv=worker.kv_transfer is not None and worker.kv_transfer.slow,
            cached_tokens=cached,
        )

    def tokenizer(
        self, request: ClientRequest, info: RequestInfo, matched: Matched
    ) -> Worker | None:
        if self.mode == "colocated":
            return None
        workers = self.routed()
        views = [self.view(w) for w in workers]
        index = best_decoder(views, [i for i, v in enumerate(views) if v.can_decode])
        return None if index is None else workers[index]

    def place(
        self, request: ClientRequest, info: RequestInfo, matched: Matched, tokens: int | None
    ) -> Plan:
        if tokens is None:
            tokens = max(1, request.prompt_chars // CHARS_PER_TOKEN)
        size = max(request.prompt_chars, len(info.prefix))
        workers = self.routed()  # the snapshot
        exact = info.cached or {}  # engines with KV events: what they hold, exactly
        views = [  # an engine without a prefix cache holds none of it (vllm:cache_config_info)
            self.view(w, exact[w.url])
            if w.url in exact and w.caches_prefixes
            else self.view(w, cached_tokens(tokens, matched.get(w.url, 0), self.block_chars, size))
            if w.caches_prefixes
            else self.view(w)
            for w in workers
        ]
        choice = decide(views, Job(tokens, request.max_tokens, request.local_reason), self.rules)
        if choice is None:
            raise NoWorkerAvailable("no engine of the pool or decode worker is available")
        if self.prompts is not None and self.mode == "adaptive":
            long = choice.reason in PREFILL_SIDE_REASONS
            self.prompts(tokens if long else tokens - views[choice.decode].cached_tokens, long)
        if choice.prefill is None:
            return Plan(workers[choice.decode], "local", choice.reason, tokens=tokens)
        prefiller = workers[choice.prefill]
        return Plan(workers[choice.decode], "remote", choice.reason, prefiller, tokens)

    def another(self, leg: Leg, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        """Another engine on the `leg` side (then any that can do it), least busy first."""
        workers = [w for w in self.routed() if w not in exclude]
        views = [self.view(w) for w in workers]
        capable = [
            i for i, v in enumerate(views) if (v.can_prefill if leg == "prefill" else v.can_decode)
        ]
        side = [i for i in capable if views[i].lean == leg] or capable
        best = best_prefiller if leg == "prefill" else best_decoder
        index = best(views, side)
        return None if index is None else workers[index]

    def forget(self, worker: Worker) -> None:
        return None  # nothing is kept per engine (the planner's prefix index forgets it)
