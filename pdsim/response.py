"""Response bodies as vLLM 0.32 writes them: full completions and the SSE events of a stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from pdsim.errors import error_body
from pdsim.model import Step
from pdsim.request import Kind


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Usage of a full response (a stream's usage chunk has only the three counts)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


@dataclass(frozen=True)
class Choice:
    """One finished choice of a full response."""

    index: int
    text: str
    final: Step
    token_ids: list[int] | None = None  # the generated ids, with return_token_ids
    logprobs: dict[str, Any] | None = None
    prompt_logprobs: list[Any] | None = None  # completions: the choice's prompt's
    prompt_token_ids: list[int] | None = None  # completions, with return_token_ids


def _choice_body(kind: Kind, c: Choice) -> dict[str, Any]:
    if kind == "chat":
        return {
            "index": c.index,
            "message": {
                "role": "assistant",
                "content": c.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": c.logprobs,
            "finish_reason": c.final.finish_reason,
            "stop_reason": c.final.stop_reason,
            "token_ids": c.token_ids,
            "routed_experts": None,
        }
    return {
        "index": c.index,
        "text": c.text,
        "logprobs": c.logprobs,
        "finish_reason": c.final.finish_reason,
        "stop_reason": c.final.stop_reason,
        "token_ids": c.token_ids,
        "prompt_logprobs": c.prompt_logprobs,
        "prompt_token_ids": c.prompt_token_ids,
        "routed_experts": None,
    }


def full_response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    completion_tokens: int,
    kv_transfer_params: dict[str, Any] | None,
    system_fingerprint: str | None = None,
    chat_prompt: tuple[list[int] | None, list[Any] | None] = (None, None),
) -> bytes:
    """A non-streaming response body, keys in vLLM 0.32's order; ``chat_prompt`` = a chat
    response's top-level prompt token ids (with return_token_ids) and prompt logprobs."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [_choice_body(kind, c) for c in choices],
        "service_tier": None,
        "system_fingerprint": system_fingerprint,
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if kind == "chat":
        body["prompt_logprobs"] = chat_prompt[1]
        body["prompt_token_ids"] = chat_prompt[0]
        body["prompt_text"] = None
    body["kv_transfer_params"] = kv_transfer_params
    body["ec_transfer_params"] = None
    body["metrics"] = None
    return orjson.dumps(body)


class ChunkWriter:
    """Builds the SSE events of one stream; the per-token path of a plain stream (one choice,
    no logprobs) is byte concatenation, anything else goes through ``event``.

    Shapes as vLLM 0.32 sends them: a chat stream opens with a role chunk per choice (empty
    content, no ``token_ids``); a text chunk may carry several tokens; the finishing chunk
    carries the last text and ``finish_reason`` (and the ``system_fingerprint`` unless a usage
    chunk follows); the usage chunk has ``"choices": []``.
    """

    def __init__(
        self,
        kind: Kind,
        rid: str,
        created: int,
        model: str,
        system_fingerprint: str | None = None,
        include_usage: bool = False,
    ) -> None:
        self.kind = kind
        self._fingerprint = system_fingerprint
        # vLLM stamps the fingerprint on finishing chunks only when no usage chunk follows
        self._final_fingerprint = None if include_usage else system_fingerprint
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = orjson.dumps({"id": rid, "object": obj, "created": created, "model": model})[
            :-1
        ]
        if kind == "chat":
            self._pre = self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._post = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}'
        else:
            self._pre = self._head + b',"choices":[{"index":0,"text":'
            self._post = (
                b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
                b'"prompt_token_ids":null,"token_ids":null}]}'
            )

    def role(
        self,
        index: int = 0,
        usage: dict[str, int] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> bytes:
        """A chat stream's role chunk; it carries the prompt's ids (the chat template applied)
        when the request asked for token ids."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}  # fmt: skip
        tail: dict[str, Any] = {"prompt_token_ids": prompt_token_ids, "prompt_text": None}
        if usage is not None:
            tail["usage"] = usage
        return self._event(choice, tail)

    def delta(self, text: str) -> bytes:
        return b"data: " + self._pre + orjson.dumps(text) + self._post + b"\n\n"

    def final(self, step: Step) -> bytes:
        """The finishing chunk; ``step.text`` is all text not sent yet."""
        return self.event(0, step.text, step)

    def event(
        self,
        index: int,
        text: str,
        final: Step | None = None,
        logprobs: dict[str, Any] | None = None,
        prompt_token_ids: list[int] | None = None,
        usage: dict[str, int] | None = None,
        token_ids: list[int] | None = None,
    ) -> bytes:
        """Any text chunk: choice `index`, finishing when `final` is given; `token_ids`: the
        chunk's generated ids, when the request asked for them."""
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = None if final is None else final.finish_reason
        if self.kind == "completion" or final is not None:
            choice["stop_reason"] = None if final is None else final.stop_reason
        if self.kind == "completion":
            choice["prompt_token_ids"] = prompt_token_ids
        choice["token_ids"] = token_ids
        tail: dict[str, Any] = {}
        if final is not None and self._final_fingerprint is not None:
            tail["system_fingerprint"] = self._final_fingerprint
        if usage is not None:
            tail["usage"] = usage
        return self._event(choice, tail)

    def _event(self, choice: dict[str, Any], tail: dict[str, Any]) -> bytes:
        body = self._head + b',"choices":[' + orjson.dumps(choice) + b"]"
        if tail:
            body += b"," + orjson.dumps(tail)[1:-1]
        return b"data: " + body + b"}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        u = usage(prompt_tokens, completion_tokens)
        del u["prompt_tokens_details"], u["completion_tokens_details"]
        tail = orjson.dumps({"usage": u, "system_fingerprint": self._fingerprint})[1:]
        return b"data: " + self._head + b',"choices":[],' + tail + b"\n\n"

    @staticmethod
    def error(message: str, err_type: str, code: int) -> bytes:
        return b"data: " + error_body(message, err_type, code) + b"\n\n"


def stream_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage of a streamed chunk (continuous usage): the three counts."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}  # fmt: skip


DONE = b"data: [DONE]\n\n"
