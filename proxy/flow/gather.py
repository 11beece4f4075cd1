"""A whole (non-streamed) answer that may migrate: asked for as a stream, gathered whole.

A decoder that fails mid-way through a whole answer has generated tokens that the proxy would
lose if it read the answer whole. So the decode leg of a whole answer that could be continued
(`as_stream`: a request that `proxy.flow.migrate.unmigratable` would let through if streamed)
asks its decoder for a stream, with usage; the stream goes through the same transcript, seam
and continuation as a client's stream, and `Gather`, the sink it writes into, puts the events
together into the one JSON answer the client asked for: the same id, created time and model,
each choice's text, finish and stop reason (and token ids, when asked for), and the usage of
the whole answer. Nothing reaches the client before the answer is whole, so a failure that
cannot be continued is still an ordinary error response.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from proxy.flow.migrate import unmigratable
from proxy.flow.sink import Sink
from proxy.request import CHAT, ClientRequest

_USAGE_DETAILS = {"prompt_tokens_details": None, "completion_tokens_details": None}
_MESSAGE_NULLS = dict.fromkeys(("refusal", "annotations", "audio", "function_call", "reasoning"))


def gatherable(request: ClientRequest) -> bool:
    """Whether this whole answer is read as a stream: one that could be continued, and not
    an echo (a stream echoes the prompt otherwise than a whole answer)."""
    if request.stream or request.body.get("echo"):
        return False
    return unmigratable(as_stream(request)) is None


def as_stream(request: ClientRequest) -> ClientRequest:
    """`request` asked for as a stream with usage (the decode leg's view of a whole answer)."""
    body = {**request.body, "stream": True, "stream_options": {"include_usage": True}}
    return replace(request, body=body, stream=True, include_usage=True)


class Gather:
    """The sink of a whole answer asked for as a stream: its events, gathered, go to `out` as
    one JSON answer when the stream ends."""

    def __init__(self, out: Sink, request: ClientRequest) -> None:
        self._out = out
        self._chat = request.path == CHAT
        self._ids = bool(request.body.get("return_token_ids"))
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._fingerprint: Any = None
        self._prompt_ids: Any = None  # a chat stream's, at the top of its first event
        self.started = False  # the first event came: from here a failure is continued

    async def whole(self, status: int, body: bytes) -> None:
        await self._out.whole(status, body)  # an answer asked for whole after all

    async def start_stream(self) -> None:
        self.started = True

    async def chunk(self, data: bytes) -> None:
        self._gather(data)

    async def end(self, data: bytes = b"") -> None:
        self._gather(data)
        await self._out.whole(200, orjson.dumps(self._answer()))

    def _gather(self, data: bytes) -> None:
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue  # [DONE], a keep-alive comment
            parsed = orjson.loads(event[6:])
            if not self._head:
                self._head = {k: parsed.get(k) for k in ("id", "created", "model")}
            if isinstance(parsed.get("usage"), dict):
                self._usage = parsed["usage"]
            if parsed.get("system_fingerprint") is not None:
                self._fingerprint = parsed["system_fingerprint"]
            if self._ids and parsed.get("prompt_token_ids") is not None:
                self._prompt_ids = parsed["prompt_token_ids"]
            for choice in parsed.get("choices") or ():
                self._take(choice)

    def _take(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index") or 0)
        into = self._choices.setdefault(index, {"text": [], "ids": [], "prompt_ids": None})
        delta = choice.get("delta") if self._chat else None
        piece = (delta or {}).get("content") if self._chat else choice.get("text")
        if piece:
            into["text"].append(piece)
        into["ids"] += choice.get("token_ids") or ()
        if choice.get("prompt_token_ids") is not None:
            into["prompt_ids"] = choice["prompt_token_ids"]
        if choice.get("finish_reason") is not None:
            into["finish_reason"] = choice["finish_reason"]
            into["stop_reason"] = choice.get("stop_reason")

    def _answer(self) -> dict[str, Any]:
        """The answer in vLLM 0.32's shape and key order (as the engine writes it whole)."""
        chat = self._chat
        answer: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
            "choices": [self._choice(i, c) for i, c in sorted(self._choices.items())],
            "service_tier": None,
            "system_fingerprint": self._fingerprint,
        }
        if self._usage is not None:  # a stream's usage leaves out the details that are null
            answer["usage"] = {**self._usage, **_USAGE_DETAILS, **self._usage}
        if chat:
            answer.update(prompt_logprobs=None, prompt_token_ids=self._prompt_ids, prompt_text=None)
        answer.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return answer

    def _choice(self, index: int, got: dict[str, Any]) -> dict[str, Any]:
        text = "".join(got["text"])
        ids = got["ids"] if self._ids else None
        end = {"finish_reason": got.get("finish_reason"), "stop_reason": got.get("stop_reason")}
        if self._chat:
            message = {"role": "assistant", "content": text, **_MESSAGE_NULLS}
            return {"index": index, "message": message, "logprobs": None, **end,
                    "token_ids": ids, "routed_experts": None}  # fmt: skip
        return {"index": index, "text": text, "logprobs": None, **end, "token_ids": ids,
                "prompt_logprobs": None, "prompt_token_ids": got["prompt_ids"] if self._ids
                else None, "routed_experts": None}  # fmt: skip
