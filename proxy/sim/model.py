"""The deterministic "model": greedy generation where each next token is a hash of the prompt
token ids and of the tokens generated so far.

Invariant: the same prompt ids and the same ``SamplingSpec`` always give the same tokens,
text, finish reason and stop reason, in any process: a request served directly and one whose
KV came from another instance produce identical output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from proxy.sim.tokenizer import EOS_ID, SimTokenizer

_MASK64 = (1 << 64) - 1
_EOS_SCALE = 1 << 20
FinishReason = Literal["stop", "length"]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_seed(prompt_ids: list[int]) -> int:
    """Stable across processes: hashing a tuple of ints does not depend on PYTHONHASHSEED."""
    return hash(tuple(prompt_ids)) & _MASK64


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling parameters the simulator honours (greedy: temperature etc. are ignored)."""

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    include_stop_str_in_output: bool = False


@dataclass(frozen=True)
class Step:
    """One generated token and the text it releases (text held back for stop strings lags)."""

    token_id: int
    text: str
    finish_reason: FinishReason | None
    stop_reason: int | str | None


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
        self._holdback = max((len(s) for s in spec.stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self.token_ids: list[int] = []
        self.finished = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[: self._emitted]

    def _choose(self) -> int:
        x = _splitmix64(self._state)
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

    def step(self) -> Step:
        """Generate the next token; must not be called once ``finished``."""
        tid = self._choose()
        self._state = _splitmix64(self._state ^ (tid * 0x9E3779B1))
        self.token_ids.append(tid)
        spec = self._spec
        n = len(self.token_ids)
        if tid == EOS_ID:
            return self._finish(tid, "stop", None)
        if tid in spec.stop_token_ids:
            return self._finish(tid, "stop", tid)
        self._text += self._tok.token_text(tid)
        if spec.stop and n >= spec.min_tokens:
            hit = self._find_stop()
            if hit is not None:
                pos, stop = hit
                self._text = self._text[
                    : pos + len(stop) if spec.include_stop_str_in_output else pos
                ]
                return self._finish(tid, "stop", stop)
        if n >= spec.max_tokens:
            return self._finish(tid, "length", None)
        release = len(self._text) - self._holdback
        if release <= self._emitted:
            return Step(tid, "", None, None)
        delta = self._text[self._emitted : release]
        self._emitted = release
        return Step(tid, delta, None, None)

    def _find_stop(self) -> tuple[int, str] | None:
        start = max(0, self._emitted - self._holdback)
        best: tuple[int, str] | None = None
        for stop in self._spec.stop:
            pos = self._text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _finish(self, tid: int, reason: FinishReason, stop_reason: int | str | None) -> Step:
        self.finished = True
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return Step(tid, delta, reason, stop_reason)
