"""The deterministic "model": greedy generation where each next token is a hash of the whole
sequence so far, prompt and generated tokens alike: the context state is one fold over the
token ids (``advance``), whether a token came in the prompt or was generated.

Invariants: the same prompt ids and the same ``SamplingSpec`` always give the same tokens,
text, finish reason and stop reason, in any process: a request served directly and one whose
KV came from another instance produce identical output. And, as with a real model, a greedy
answer continued from its prompt followed by its first k generated ids (``max_tokens`` less k)
yields exactly the rest of the uninterrupted answer: what a migrated stream relies on.

Sampling: with a temperature above vLLM's greedy threshold and a ``seed``, each step takes the
greedy token or one of the next two candidates (``candidate``), as a hash of the seed and the
step says; so a seed picks one reproducible sample, and vLLM's ``seed + j`` for the j-th of n
samples gives n different ones. Without a seed every sample is the greedy one (vLLM's would
differ at random). Beam search's j-th beam starts with candidate j, then goes greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdsim.tokenizer import EOS_ID, SimTokenizer

_MASK64 = (1 << 64) - 1
_EOS_SCALE = 1 << 20
_ORIGIN = 0x2545F4914F6CDD1D  # the context state of an empty sequence
FinishReason = Literal["stop", "length"]


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_seed(prompt_ids: list[int]) -> int:
    """The context state after `prompt_ids`: the fold of ``advance`` from a fixed origin, the
    same whether these ids were a prompt or generated (stable across processes)."""
    state = _ORIGIN
    for token_id in prompt_ids:
        state = advance(state, token_id)
    return state


def advance(state: int, token_id: int) -> int:
    """The context state after `token_id`."""
    return splitmix64(state ^ (token_id * 0x9E3779B1))


def candidate(state: int, rank: int, gen_ids: tuple[int, ...], greedy: int) -> int:
    """The `rank`-th most likely token in context `state` (rank 0: the greedy one)."""
    if rank == 0:
        return greedy
    i = (splitmix64(state + rank * 0x632BE59BD9B4E019) >> 24) % len(gen_ids)
    while gen_ids[i] == greedy:
        i = (i + 1) % len(gen_ids)
    return gen_ids[i]


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling parameters the simulator honours (greedy: temperature etc. are ignored)."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    include_stop_str_in_output: bool = False
    seed: int | None = None  # sampling seed (None: greedy)
    first_rank: int = 0  # beam search: the candidate this beam starts with


@dataclass(frozen=True)
class Step:
    """One generated token and the text it releases (text held back for stop strings lags)."""

    token_id: int
    text: str
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    state: int = 0  # the context the token was chosen in (for its logprobs)
    greedy: int = 0  # the most likely token in that context


class Generation:
    """The state of one sequence's greedy generation."""

    def __init__(
        self,
        tokenizer: SimTokenizer,
        prompt_ids: list[int],
        spec: SamplingSpec,
        eos_probability: float,
    ) -> None:
        self._tok = tokenizer
        self._spec = spec
        self._state = prompt_seed(prompt_ids)
        self._eos_threshold = int(eos_probability * _EOS_SCALE)
        # vLLM holds back the text that could begin a stop string only when the stop string
        # is cut from the output (with include_stop_str_in_output nothing is held)
        self._holdback = (
            0 if spec.include_stop_str_in_output else max(map(len, spec.stop), default=1) - 1
        )
        self._text = ""
        self._emitted = 0
        self._sampler = None if spec.seed is None else splitmix64(spec.seed & _MASK64)
        self.token_ids: list[int] = []
        self.finished = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[: self._emitted]

    def _choose(self) -> int:
        x = splitmix64(self._state)
        gen_ids = self._tok.generation_ids
        tid = EOS_ID if x % _EOS_SCALE < self._eos_threshold else gen_ids[(x >> 24) % len(gen_ids)]
        spec = self._spec
        masked = len(self.token_ids) < spec.min_tokens
        if (tid == EOS_ID and (spec.ignore_eos or masked)) or (
            masked and tid in spec.stop_token_ids
        ):
            i = (x >> 40) % len(gen_ids)
            tid = gen_ids[i]
            while tid in spec.stop_token_ids:
                i = (i + 1) % len(gen_ids)
                tid = gen_ids[i]
        return tid

    def _sample(self, greedy: int) -> int:
        """The greedy token, or another candidate when sampling (seed) or starting a beam."""
        rank = self._spec.first_rank if not self.token_ids else 0
        if self._sampler is not None:
            rank = self._sampler % 3
            self._sampler = splitmix64(self._sampler)
        if rank == 0 or greedy == EOS_ID:
            return greedy
        tid = candidate(self._state, rank, self._tok.generation_ids, greedy)
        return greedy if tid in self._spec.stop_token_ids else tid

    def step(self) -> Step:
        """Generate the next token; must not be called once ``finished``."""
        state = self._state
        greedy = self._choose()
        tid = self._sample(greedy)
        self._state = advance(state, tid)
        self.token_ids.append(tid)
        return self._after(tid, state, greedy)

    def _after(self, tid: int, state: int, greedy: int) -> Step:
        spec = self._spec
        n = len(self.token_ids)
        if tid == EOS_ID:
            return self._finish(tid, "stop", None, state, greedy)
        if tid in spec.stop_token_ids:
            return self._finish(tid, "stop", tid, state, greedy)
        self._text += self._tok.token_text(tid)
        if spec.stop and n >= spec.min_tokens:
            hit = self._find_stop()
            if hit is not None:
                pos, stop = hit
                self._text = self._text[
                    : pos + len(stop) if spec.include_stop_str_in_output else pos
                ]
                return self._finish(tid, "stop", stop, state, greedy)
        if n >= spec.max_tokens:
            return self._finish(tid, "length", None, state, greedy)
        release = len(self._text) - self._holdback
        if release <= self._emitted:
            return Step(tid, "", None, None, state, greedy)
        delta = self._text[self._emitted : release]
        self._emitted = release
        return Step(tid, delta, None, None, state, greedy)

    def _find_stop(self) -> tuple[int, str] | None:
        start = max(0, self._emitted - self._holdback)
        best: tuple[int, str] | None = None
        for stop in self._spec.stop:
            pos = self._text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _finish(
        self, tid: int, reason: FinishReason, stop_reason: int | str | None, state: int, greedy: int
    ) -> Step:
        self.finished = True
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return Step(tid, delta, reason, stop_reason, state, greedy)
