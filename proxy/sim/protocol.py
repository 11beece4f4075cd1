"""OpenAI/vLLM wire shapes: request validation and response bodies, as bytes.

Validation follows vLLM 0.32's serving layer: an unknown model is a 404, a missing ``model`` is
accepted, ``max_tokens`` is clamped to the context left after the prompt, and a prompt longer
than ``max_model_len`` is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.sim.model import SamplingSpec, Step
from proxy.sim.tokenizer import SimTokenizer

Kind = Literal["completion", "chat"]


class ApiError(Exception):
    """An error rendered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        return error_body(str(self), self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


@dataclass(frozen=True)
class GenRequest:
    """A validated generation request."""

    kind: Kind
    prompt_ids: list[int]
    spec: SamplingSpec
    stream: bool
    include_usage: bool
    kv_params: dict[str, Any] | None


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(f"{name} must be an integer.", param=name)
    return value


def _prompt_ids(kind: Kind, body: dict[str, Any], tok: SimTokenizer) -> list[int]:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list.", param="messages")
        try:
            text = tok.apply_chat_template(messages, bool(body.get("add_generation_prompt", True)))
        except ValueError as e:
            raise ApiError(str(e), param="messages") from e
        return tok.encode(text)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt, bool(body.get("add_special_tokens", True)))
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError("The simulator serves one prompt per request.", param="prompt")
    raise ApiError("prompt must be a string or a list of token ids.", param="prompt")


def parse_generation(
    kind: Kind, body: Any, model: str, max_model_len: int, tok: SimTokenizer
) -> GenRequest:
    """Validate a completion or chat body; raises ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    requested = body.get("model")
    if requested is not None and requested != model:
        raise ApiError(
            f"The model `{requested}` does not exist.", 404, "NotFoundError", param="model"
        )
    n = _int_field(body, "n")
    if n is not None and n != 1:
        raise ApiError("The simulator supports only n=1.", param="n")
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError("Stream options can only be defined when `stream=True`.")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))

    prompt_ids = _prompt_ids(kind, body, tok)
    if len(prompt_ids) > max_model_len:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {len(prompt_ids)} tokens. Please shorten the prompt.",
            param="input_tokens",
        )
    if kind == "chat":
        name = (
            "max_completion_tokens"
            if body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        max_tokens = _int_field(body, name)
    else:
        name = "max_tokens"
        max_tokens = _int_field(body, name)
        if max_tokens is None:
            max_tokens = 16
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(f"{name} must be at least 1, got {max_tokens}.", param=name)
    room = max_model_len - len(prompt_ids)
    max_tokens = room if max_tokens is None else min(max_tokens, room)
    if max_tokens < 1:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens and the prompt "
            f"uses all of them, leaving no room for output.",
            param="max_tokens",
        )
    min_key = "min_completion_tokens" if "min_completion_tokens" in body else "min_tokens"
    min_tokens = _int_field(body, min_key) or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise ApiError(f"{min_key} must be between 0 and max_tokens.", param=min_key)

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise ApiError("stop must be a string or a list of strings.", param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise ApiError("stop_token_ids must be a list of integers.", param="stop_token_ids")
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise ApiError("kv_transfer_params must be an object.", param="kv_transfer_params")
    spec = SamplingSpec(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stop=stops,
        stop_token_ids=frozenset(stop_ids),
        include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
    )
    return GenRequest(kind, prompt_ids, spec, stream, include_usage, kv)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    final: Step,
    prompt_tokens: int,
    completion_tokens: int,
    kv_transfer_params: dict[str, Any] | None,
) -> bytes:
    """A non-streaming response body."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": final.finish_reason,
            "stop_reason": final.stop_reason,
            "token_ids": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": final.finish_reason,
            "stop_reason": final.stop_reason,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
        }
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if kind == "chat":
        body["prompt_logprobs"] = None
        body["prompt_token_ids"] = None
    body["kv_transfer_params"] = kv_transfer_params
    return orjson.dumps(body)


class ChunkWriter:
    """Builds the SSE events of one stream; the per-token path is plain byte concatenation."""

    def __init__(self, kind: Kind, rid: str, created: int, model: str) -> None:
        self.kind = kind
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

    def role(self) -> bytes:
        return (
            b"data: "
            + self._head
            + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def delta(self, text: str) -> bytes:
        return b"data: " + self._pre + orjson.dumps(text) + self._post + b"\n\n"

    def final(self, step: Step) -> bytes:
        tail = orjson.dumps(
            {
                "logprobs": None,
                "finish_reason": step.finish_reason,
                "stop_reason": step.stop_reason,
                "token_ids": None,
            }
        )[1:]
        if self.kind == "chat":
            delta = orjson.dumps({"content": step.text} if step.text else {})
            body = self._head + b',"choices":[{"index":0,"delta":' + delta + b"," + tail
        else:
            body = self._head + b',"choices":[{"index":0,"text":' + orjson.dumps(step.text)
            body += b"," + tail
        return b"data: " + body + b"]}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        u = usage(prompt_tokens, completion_tokens)
        del u["prompt_tokens_details"]
        return b"data: " + self._head + b',"choices":[],"usage":' + orjson.dumps(u) + b"}\n\n"

    @staticmethod
    def error(message: str, err_type: str, code: int) -> bytes:
        return b"data: " + error_body(message, err_type, code) + b"\n\n"


DONE = b"data: [DONE]\n\n"
