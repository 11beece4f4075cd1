"""Conditional disaggregation in the request path: ask for the prompt's exact token count and
estimate what the chosen decoder has cached, then let the pure decision (policies.conditional)
say whether the prefill leg is worth it.

What a decoder has cached is estimated from the proxy's own history: a PrefixIndex of the prompt
prefixes it sent to each decoder (a decoder keeps the KV it pulled or computed in its prefix
cache). Token counts come from the decoder's `/tokenize` (the chat template included), unless
the prompt is long beyond doubt with nothing cached (see ConditionalDisagg.needs_tokens).
"""

from __future__ import annotations

import logging

import orjson

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.errors import ProxyError
from proxy.observe.metrics import ProxyMetrics
from proxy.place.policies import RequestInfo
from proxy.place.policies.conditional import ConditionalDisagg, Decision
from proxy.place.prefix import PrefixIndex, prefix_blocks
from proxy.request import CHAT, ClientRequest

log = logging.getLogger("pdproxy")


def tokenize_body(request: ClientRequest) -> bytes:
    body = request.body
    if request.path == CHAT:
        wanted = {"model": body.get("model"), "messages": body.get("messages")}
        wanted["add_generation_prompt"] = body.get("add_generation_prompt", True)
        for key in ("chat_template", "chat_template_kwargs", "tools"):
            if key in body:
                wanted[key] = body[key]
        return orjson.dumps(wanted)
    return orjson.dumps({"model": body.get("model"), "prompt": body.get("prompt")})


async def count_tokens(
    engine: EngineClient, request: ClientRequest, worker: Worker, timeout: float
) -> int | None:
    """The prompt's exact token count from `worker`'s /tokenize (the chat template included);
    a prompt of token ids is counted as it is; None when the engine cannot say."""
    prompt = request.body.get("prompt") if request.path != CHAT else None
    if isinstance(prompt, list) and all(type(t) is int for t in prompt):
        return len(prompt)
    try:
        raw = await engine.call(
            worker, "/tokenize", tokenize_body(request), request.request_id, timeout, "tokenize"
        )
        count = orjson.loads(raw).get("count")
    except (ProxyError, orjson.JSONDecodeError, AttributeError) as exc:
        log.info("request %s: /tokenize on %s failed: %s", request.request_id, worker.url, exc)
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


class DisaggPlanner:
    def __init__(
        self,
        decision: ConditionalDisagg,
        engine: EngineClient,
        metrics: ProxyMetrics,
        block_chars: int,
        tokenize_timeout: float,
    ) -> None:
        self.decision = decision
        self.engine = engine
        self.metrics = metrics
        self.block_chars = block_chars
        self.tokenize_timeout = tokenize_timeout
        self.index = PrefixIndex()

    def forget(self, decoder: Worker) -> None:
        """`decoder` left: what it had cached no longer matters."""
        self.index.forget(decoder.url)

    async def count_tokens(self, request: ClientRequest, decoder: Worker) -> int | None:
        return await count_tokens(self.engine, request, decoder, self.tokenize_timeout)

    async def plan(self, request: ClientRequest, decoder: Worker, info: RequestInfo) -> Decision:
        """Whether this request on `decoder` gets a prefill leg; counted in the metrics."""
        blocks = prefix_blocks(info.prefix, self.block_chars)
        cached_chars = self.index.matched(blocks).get(decoder.url, 0) * self.block_chars
        if not decoder.caches_prefixes:
            cached_chars = 0  # it serves the same prefix again from scratch
        self.index.record(blocks, decoder.url)  # it will hold this prefix either way
        decision = Decision(True, "long")
        if decoder.kv_transfer is not None and decoder.kv_transfer.slow:
            decision = self.decision.decide(0, slow_kv=True)
        elif self.decision.needs_tokens(request.prompt_chars, cached_chars):
            tokens = await self.count_tokens(request, decoder)
            if tokens is not None:
                share = min(1.0, cached_chars / max(request.prompt_chars, len(info.prefix), 1))
                decision = self.decision.decide(tokens, int(tokens * share))
        self.metrics.disagg_decisions.labels(
            "remote" if decision.remote_prefill else "local", decision.reason
        ).inc()
        return decision
