"""Conditional disaggregation: whether a request needs the prefill leg at all (pure; the pool's
plan, proxy.place.pool, asks the same two questions: `short` and `mostly_cached`).

A prefill leg costs a round trip to a prefiller and a KV transfer; for a prompt the decoder
can compute in less than that (a short one), or that the decoder has mostly cached already
(a later turn of a conversation it served), sending it straight to the decoder is faster and
spares the prefiller. Long uncached prompts still go through a prefiller, so that their prefill
does not stall the decoder's running streams, unless the decoder's recent pulls are slow
(proxy.control.kvhealth): over TCP a pull costs about ten times the prefill it saves (0.38
GB/s against an H200's 40k prompt tokens/s for an 8B model, 128 KiB of KV per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["short", "cached", "long", "slow_kv"]


def short(tokens: int, min_prefill_tokens: int) -> bool:
    """Too few prompt tokens for a prefill leg to pay: moving them costs more than computing
    them beside the decodes (a pull has a fixed cost of its own)."""
    return tokens < min_prefill_tokens


def mostly_cached(tokens: int, cached_tokens: int, min_prefill_tokens: int) -> bool:
    """All but fewer than `min_prefill_tokens` of the prompt is cached where it would decode."""
    return tokens - min(cached_tokens, tokens) < min_prefill_tokens


@dataclass(frozen=True, slots=True)
class Decision:
    remote_prefill: bool
    reason: Reason


class ConditionalDisagg:
    """Prefill on the decoder when fewer than `min_prefill_tokens` of the prompt's tokens are
    not already cached there; otherwise on a prefiller."""

    def __init__(self, min_prefill_tokens: int) -> None:
        self.min_prefill_tokens = min_prefill_tokens

    def decide(self, prompt_tokens: int, cached_tokens: int = 0, slow_kv: bool = False) -> Decision:
        if slow_kv:
            return Decision(False, "slow_kv")
        if short(prompt_tokens, self.min_prefill_tokens):
            return Decision(False, "short")
        if mostly_cached(prompt_tokens, cached_tokens, self.min_prefill_tokens):
            return Decision(False, "cached")
        return Decision(True, "long")

    def needs_tokens(self, prompt_chars: int, cached_chars: int) -> bool:
        """Whether the exact count matters: a prompt of this many characters, none of them
        cached, of at least 16 characters per token on average would still be long, so the
        answer is already known ("long") without asking the engine's /tokenize."""
        return cached_chars > 0 or prompt_chars < 16 * self.min_prefill_tokens
