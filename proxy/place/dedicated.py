"""Placement on dedicated roles: the decode policy picks the decoder, the prefill policy the
prefiller, and the prompt is computed remotely unless a reason keeps it on the decoder:

    prompt_logprobs, beam_search   the request must be served whole by one engine
                                   (ClientRequest.local_reason)
    slow_kv, short, cached         conditional disaggregation (proxy.place.conditional), when on
    long                           conditional disaggregation found the prefill leg worth it
    dedicated                      conditional disaggregation is off: every prompt is prefilled
                                   on a prefiller

What a decoder has cached is known exactly where it publishes KV events (`info.cached`, from the
prompt's token ids: proxy.place.kvindex), else estimated from the proxy's own history
(`matched`: the planner's prefix index of the prompts each decoder was given); nothing is
counted on an engine that keeps no prefix cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from proxy.control.workers import Worker
from proxy.errors import NoWorkerAvailable
from proxy.place.conditional import ConditionalDisagg, Decision
from proxy.place.plan import Leg, Matched, Plan
from proxy.place.policies import RequestInfo
from proxy.place.prefix import cached_tokens
from proxy.place.router import Router
from proxy.request import ClientRequest


@dataclass
class DedicatedPlacement:
    router: Router
    block_chars: int
    conditional: ConditionalDisagg | None = None  # conditional disaggregation, when on
    name: ClassVar[str] = "router"

    def _cached_chars(self, worker: Worker, matched: Matched) -> int:
        if not worker.caches_prefixes:
            return 0  # it computes the same prefix again from scratch
        return matched.get(worker.url, 0) * self.block_chars

    def tokenizer(
        self, request: ClientRequest, info: RequestInfo, matched: Matched
    ) -> Worker | None:
        """With conditional disaggregation, the least loaded decoder counts the prompt when the
        count can change the decision for any decoder (see ConditionalDisagg.needs_tokens)."""
        if self.conditional is None or request.local_reason is not None:
            return None
        decode = self.router.decode
        decode.refresh()
        available = [w for w in decode.workers if w.available]
        cached = max((self._cached_chars(w, matched) for w in available), default=0)
        exact = any(w.prefix_source == "events" for w in available)  # the estimate can miss
        if not available or not (
            exact or self.conditional.needs_tokens(request.prompt_chars, cached)
        ):
            return None
        return min(available, key=lambda w: (w.inflight, w.inflight_chars))

    def place(
        self, request: ClientRequest, info: RequestInfo, matched: Matched, tokens: int | None
    ) -> Plan:
        decoder = self.router.pick_decode(info)
        if decoder is None:
            raise NoWorkerAvailable("no decode worker is available")
        if request.local_reason is not None:
            return Plan(decoder, "local", request.local_reason, tokens=tokens)
        reason = "dedicated"
        if self.conditional is not None:
            decision = self._decide(request, info, decoder, matched, tokens)
            if not decision.remote_prefill:
                return Plan(decoder, "local", decision.reason, tokens=tokens)
            reason = decision.reason
        prefiller = self.router.pick_prefill(info, (decoder,))
        return Plan(decoder, "remote", reason, prefiller, tokens)

    def _decide(
        self,
        request: ClientRequest,
        info: RequestInfo,
        decoder: Worker,
        matched: Matched,
        tokens: int | None,
    ) -> Decision:
        assert self.conditional is not None
        cached_chars = self._cached_chars(decoder, matched)
        if decoder.kv_transfer is not None and decoder.kv_transfer.slow:
            return self.conditional.decide(0, slow_kv=True)
        exact = None if info.cached is None else info.cached.get(decoder.url)
        if exact is not None and tokens is not None:
            return self.conditional.decide(tokens, exact if decoder.caches_prefixes else 0)
        if tokens is None or not self.conditional.needs_tokens(request.prompt_chars, cached_chars):
            return Decision(True, "long")
        size = max(request.prompt_chars, len(info.prefix))
        cached = cached_tokens(tokens, matched.get(decoder.url, 0), self.block_chars, size)
        return self.conditional.decide(tokens, cached if cached_chars else 0)

    def another(self, leg: Leg, info: RequestInfo, exclude: Sequence[Worker]) -> Worker | None:
        if leg == "prefill":
            return self.router.pick_prefill(info, exclude)
        return self.router.pick_decode(info, exclude)

    def forget(self, worker: Worker) -> None:
        self.router.forget(worker)
