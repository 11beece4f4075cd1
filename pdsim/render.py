"""What one choice of a response carries beyond its generated text: the echoed prompt, logprobs
of its tokens (and of the prompt's), as vLLM 0.32's completion and chat serving builds them.

A ``ChoiceView`` renders choice (prompt i, sample j) piece by piece: whole (one call with every
step) or streamed (one call per chunk; the echo goes with the first).
"""

from __future__ import annotations

from typing import Any

from pdsim.logprobs import (
    Position,
    chat_logprobs,
    completion_logprobs,
    position,
    prompt_logprobs_body,
    prompt_positions,
)
from pdsim.model import Step
from pdsim.request import GenRequest, Prompt
from pdsim.tokenizer import SimTokenizer


class PromptView:
    """Per prompt: its logprobs, computed once for all its choices."""

    def __init__(self, req: GenRequest, prompt: Prompt, tok: SimTokenizer) -> None:
        self.prompt = prompt
        k = req.prompt_logprobs
        self.positions = None if k is None else prompt_positions(prompt.ids, k, tok.generation_ids)
        self.body = None if self.positions is None else prompt_logprobs_body(self.positions, tok)


class ChoiceView:
    def __init__(self, req: GenRequest, tok: SimTokenizer, index: int, prompt: PromptView) -> None:
        self.req = req
        self.tok = tok
        self.index = index
        self.prompt = prompt
        self.echo_pending = req.echo is not None
        self.offset = 0  # text offset of the next logprob token (completions)
        self.tokens = 0  # output tokens so far

    @property
    def echo_text(self) -> str:
        req = self.req
        if req.kind == "chat":
            return req.echo or ""
        return "" if req.return_token_ids else self.prompt.prompt.text

    def piece(self, steps: list[Step]) -> tuple[str, dict[str, Any] | None]:
        """The text and logprobs of the next `steps` (the echo first, once)."""
        req = self.req
        self.tokens += len(steps)
        echo = self.echo_pending
        self.echo_pending = False
        text = "" if req.echo_only else "".join(s.text for s in steps)
        if echo:
            text = self.echo_text + text
        if req.logprobs is None:
            return text, None
        gen = self.tok.generation_ids
        ids = [] if req.echo_only else [s.token_id for s in steps]
        out: list[Position | None] = []
        out += [position(s.state, s.greedy, s.token_id, req.logprobs, gen) for s in steps]
        out = out[: len(ids)]
        if req.kind == "chat":
            return text, chat_logprobs([p for p in out if p is not None], req.logprobs, self.tok)
        if echo and self.prompt.positions is not None:
            ids = self.prompt.prompt.ids + ids
            out = self.prompt.positions + out
        body = completion_logprobs(ids, out, req.logprobs, self.tok, self.offset)
        if body["tokens"]:
            self.offset = body["text_offset"][-1] + len(body["tokens"][-1])
        return text, body
