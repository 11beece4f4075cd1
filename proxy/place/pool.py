"""The per-request plan: which engine answers, and whether another computes the prompt first.

A pure function of a snapshot (`EngineView`s) and the request (`Job`); no I/O, no state. In
adaptive mode, in order:

    local_reason   a request that must be served whole (prompt logprobs, beam search): local on
                   the best decode-side engine
    short          fewer than `min_prefill_tokens` prompt tokens: moving them costs more than
                   computing them beside the decodes (a pull has a fixed cost of its own)
    cached         a decode-side engine has all but fewer than `min_prefill_tokens` of the
                   prompt cached already: local there
    no_prefiller   no engine leans to prefill now (the controller has them all decoding): local
    short_output   a long prompt for at most `local_max_tokens` tokens: answered where it is
                   computed, on the best prefill-side pool engine (nothing worth moving)
    slow_kv        the chosen decoder's recent pulls are slow (KV-transfer health): local there
    prefill_busy   the prefill side is backed up: the prompt would wait behind more than
                   `max_prefill_wait` seconds of prompt work on the best prefill engine (at
                   `prefill_tokens_per_second`) and its decoder has less queued: local there,
                   so that a burst, or a prefill side the controller has not grown yet, costs
                   the decode side some inter-token latency instead of every prompt its TTFT
    single_engine  no second engine to decode on: local on the prefill engine
    long           disaggregated: prefill on the prefill-side engine with the least prompt work
                   waiting, decode on the decode-side engine with the least load

Decode side: dedicated decoders and pool engines leaning to decode (all decode-capable engines
when none leans so). Prefill side: dedicated prefillers and pool engines leaning to prefill.
Engines leaning to decode thus get no long prompt while a prefill-side engine is available,
which keeps their inter-token latency. In colocated mode every request is local on the
decode-capable engine with the least load (load_aware's measure), the fair no-PD baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.control.workers import Lean, Role
from proxy.place.conditional import mostly_cached, short

PoolMode = Literal["adaptive", "colocated"]


@dataclass(frozen=True, slots=True)
class EngineView:
    """One engine as the plan sees it."""

    role: Role  # "prefill" or "decode" (dedicated), or "pool"
    lean: Lean  # dedicated: their role; pool: the controller's assignment
    available: bool = True
    load: float = 0.0  # requests on the engine now (its scrape plus the proxy's since)
    prefill_tokens: int = 0  # prompt tokens the proxy sent it, not computed yet
    decode_streams: int = 0  # answers the proxy has it generating
    kv_full: bool = False  # its KV cache is at least routing.kv_high full
    slow_kv: bool = False  # its recent KV pulls are slow (proxy.kvhealth)
    cached_tokens: int = 0  # of this prompt, estimated in its prefix cache

    @property
    def can_decode(self) -> bool:
        return self.available and self.role != "prefill"

    @property
    def can_prefill(self) -> bool:
        return self.available and self.role != "decode"


@dataclass(frozen=True, slots=True)
class Job:
    """The request being placed."""

    tokens: int  # prompt tokens (exact when the engine's /tokenize answered)
    max_tokens: int | None = None  # the client's cap on the answer, if it set one
    local_reason: str | None = None  # it must be served whole on one engine, and why


@dataclass(frozen=True, slots=True)
class Rules:
    mode: PoolMode = "adaptive"
    min_prefill_tokens: int = 512
    local_max_tokens: int = 4
    prefill_tokens_per_second: float = 40000.0  # one engine's
    max_prefill_wait: float = math.inf  # seconds of prompt work queued before a prompt spills


@dataclass(frozen=True, slots=True)
class Choice:
    """Indexes into the snapshot: `decode` answers; `prefill` computes the prompt first, or is
    None (local: the decode engine computes it)."""

    decode: int
    prefill: int | None
    reason: str

    @property
    def local(self) -> bool:
        return self.prefill is None


def _decode_key(e: EngineView) -> tuple[bool, float, int, int]:
    return (e.kv_full, e.load, e.prefill_tokens, e.decode_streams)


def _prefill_key(e: EngineView) -> tuple[int, int, float]:
    return (e.prefill_tokens, e.decode_streams, e.load)


def best_decoder(engines: Sequence[EngineView], among: Sequence[int]) -> int | None:
    """The least loaded of `among`: a full KV cache last, then the engine's request count, then
    the prompt work waiting on it and its decode streams (lowest index on a tie)."""
    return min(among, key=lambda i: (_decode_key(engines[i]), i), default=None)


def best_prefiller(engines: Sequence[EngineView], among: Sequence[int]) -> int | None:
    """The one with the least prompt work waiting, then the fewest decode streams to stall."""
    return min(among, key=lambda i: (_prefill_key(engines[i]), i), default=None)


def decode_side(engines: Sequence[EngineView]) -> list[int]:
    """Engines that take answers: those leaning to decode, else every decode-capable one."""
    capable = [i for i, e in enumerate(engines) if e.can_decode]
    leaning = [i for i in capable if engines[i].lean == "decode"]
    return leaning or capable


def prefill_side(engines: Sequence[EngineView]) -> list[int]:
    return [i for i, e in enumerate(engines) if e.can_prefill and e.lean == "prefill"]


def plan(engines: Sequence[EngineView], job: Job, rules: Rules) -> Choice | None:
    """Where `job` goes; None when no engine can answer it."""
    capable = [i for i, e in enumerate(engines) if e.can_decode]
    if not capable:
        return None
    if rules.mode == "colocated":
        return Choice(_best(engines, capable), None, "colocated")
    side = decode_side(engines)
    if job.local_reason is not None:
        return Choice(_best(engines, side), None, job.local_reason)
    if short(job.tokens, rules.min_prefill_tokens):
        return Choice(_best(engines, side), None, "short")
    minimum = rules.min_prefill_tokens
    cached = [i for i in side if mostly_cached(job.tokens, engines[i].cached_tokens, minimum)]
    if cached:
        return Choice(max(cached, key=lambda i: (engines[i].cached_tokens, -i)), None, "cached")
    prefillers = prefill_side(engines)
    if not prefillers:
        return Choice(_best(engines, side), None, "no_prefiller")
    if job.max_tokens is not None and job.max_tokens <= rules.local_max_tokens:
        pooled = [i for i in prefillers if engines[i].can_decode]
        if pooled:
            return Choice(_first(best_prefiller(engines, pooled)), None, "short_output")
    prefiller = _first(best_prefiller(engines, prefillers))
    decoders = [i for i in side if i != prefiller]
    if not decoders:
        if engines[prefiller].can_decode:
            return Choice(prefiller, None, "single_engine")
        decoders = [i for i in capable if i != prefiller]
    decoder = _best(engines, decoders)
    if engines[decoder].slow_kv:
        return Choice(decoder, None, "slow_kv")
    if _spills(engines[prefiller], engines[decoder], job, rules):
        return Choice(decoder, None, "prefill_busy")
    return Choice(decoder, prefiller, "long")


def _spills(prefiller: EngineView, decoder: EngineView, job: Job, rules: Rules) -> bool:
    """The prompt would wait longer for the prefill engine than `max_prefill_wait`, and less
    on its decoder (both at one engine's prefill rate)."""
    remote = (prefiller.prefill_tokens + job.tokens) / rules.prefill_tokens_per_second
    local = (decoder.prefill_tokens + job.tokens) / rules.prefill_tokens_per_second
    return remote > rules.max_prefill_wait and local < remote


def _best(engines: Sequence[EngineView], among: Sequence[int]) -> int:
    return _first(best_decoder(engines, among))


def _first(index: int | None) -> int:
    assert index is not None, "chosen from a non-empty list"
    return index
