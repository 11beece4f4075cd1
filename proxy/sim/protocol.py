"""OpenAI/vLLM wire shapes: request validation and response bodies, as bytes.

Validation follows vLLM 0.32's serving layer: an unknown model is a 404, a missing ``model`` is
accepted, ``max_tokens`` is clamped to the context left after the prompt, and a prompt longer
than ``max_model_len`` is a 400. Errors come in vLLM's two flavours: a body that does not fit
the request schema (invalid JSON, a wrong type, a missing required field) is FastAPI's
``"type": "Bad Request"`` with pydantic's message and ``param`` = ``body.<field>``; a value
vLLM itself rejects (``max_tokens: 0``, no prompt, a prompt over the context) is
``"BadRequestError"`` with `` (parameter=..., value=...)`` appended to the message.
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


def schema_error(errors: list[dict[str, Any]]) -> ApiError:
    """A body that does not fit the request schema, as FastAPI reports it through vLLM."""
    label = "error" if len(errors) == 1 else "errors"
    lines = "".join(f"\n  {e!r}" for e in errors)
    return ApiError(
        f"{len(errors)} validation {label}:{lines}", 400, "Bad Request", errors[0]["loc"]
    )


def field_error(kind: str, field: str, msg: str, value: Any) -> dict[str, Any]:
    """One pydantic error entry about ``body.<field>``."""
    return {"type": kind, "loc": f"body.{field}" if field else "body", "msg": msg,
            "input": input_summary(value)}  # fmt: skip


def input_summary(value: Any) -> str:
    """How vLLM shows a rejected input: containers by size, anything else as text."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


def vllm_error(message: str, param: str | None, value: Any = None) -> ApiError:
    """A value vLLM rejects (its ``VLLMValidationError``): type ``BadRequestError``."""
    extras = [f"{k}={v}" for k, v in (("parameter", param), ("value", value)) if v is not None]
    text = f"{message} ({', '.join(extras)})" if extras else message
    return ApiError(text, 400, "BadRequestError", param)


def model_not_found(requested: Any, served: str) -> ApiError:
    return ApiError(
        f"The model `{requested}` does not exist. Valid aliases: {served}.",
        404,
        "NotFoundError",
        param="model",
    )


def not_an_object(body: Any) -> ApiError:
    msg = "Input should be a valid dictionary or object to extract fields from"
    return schema_error([field_error("model_attributes_type", "", msg, body)])


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
    return_token_ids: bool = False  # full responses only; streams keep token_ids null


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        msg = "Input should be a valid integer, unable to parse string as an integer"
        raise schema_error([field_error("int_parsing", name, msg, value)])
    if not isinstance(value, int) or isinstance(value, bool):
        raise schema_error(
            [field_error("int_type", name, "Input should be a valid integer", value)]
        )
    return value


def _prompt_ids(kind: Kind, body: dict[str, Any], tok: SimTokenizer) -> tuple[list[int], bool]:
    """The prompt's token ids, and whether they came from text (vLLM then counts an overlong
    prompt only up to ``max_model_len + 1``)."""
    if kind == "chat":
        if "messages" not in body:
            raise schema_error([field_error("missing", "messages", "Field required", body)])
        messages = body["messages"]
        if not isinstance(messages, list):
            msg = "Input should be a valid list"
            raise schema_error([field_error("list_type", "messages", msg, messages)])
        if not messages:
            raise vllm_error(
                "Cannot apply chat template to an empty conversation. "
                "Provide at least one message.",
                None,
            )
        try:
            text = tok.apply_chat_template(messages, bool(body.get("add_generation_prompt", True)))
        except ValueError as e:
            raise ApiError(str(e), param="messages") from e
        return tok.encode(text), True
    prompt = body.get("prompt")
    if prompt is None or prompt in ("", []):
        raise vllm_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt, bool(body.get("add_special_tokens", True))), True
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt), False
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError("The simulator serves one prompt per request.", param="prompt")
    msg = "Input should be a valid string"
    raise schema_error([field_error("string_type", "prompt", msg, prompt)])


def parse_generation(
    kind: Kind, body: Any, model: str, max_model_len: int, tok: SimTokenizer
) -> GenRequest:
    """Validate a completion or chat body; raises ``ApiError``."""
    if not isinstance(body, dict):
        raise not_an_object(body)
    requested = body.get("model")
    if requested is not None and requested != model:
        raise model_not_found(requested, model)
    n = _int_field(body, "n")
    if n is not None and n != 1:
        raise ApiError("The simulator supports only n=1.", param="n")
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options")
    if stream_options and not stream:
        raise vllm_error("Stream options can only be defined when `stream=True`.", "stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))

    prompt_ids, from_text = _prompt_ids(kind, body, tok)
    if len(prompt_ids) > max_model_len:
        count = max_model_len + 1 if from_text else len(prompt_ids)
        qualifier = "at least " if count == max_model_len + 1 else ""
        raise vllm_error(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {qualifier}{count} input tokens, which exceeds this limit even "
            f"without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            count,
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
        # vLLM names max_tokens even when the chat client sent max_completion_tokens
        raise vllm_error(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
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
        raise schema_error(
            [
                field_error("string_type", "stop", "Input should be a valid string", stop),
                field_error("list_type", "stop", "Input should be a valid list", stop),
            ]
        )
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        msg = "Input should be a valid list of integers"
        raise schema_error([field_error("list_type", "stop_token_ids", msg, stop_ids)])
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        msg = "Input should be a valid dictionary"
        raise schema_error([field_error("dict_type", "kv_transfer_params", msg, kv)])
    spec = SamplingSpec(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stop=stops,
        stop_token_ids=frozenset(stop_ids),
        include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
    )
    return_ids = bool(body.get("return_token_ids"))
    return GenRequest(kind, prompt_ids, spec, stream, include_usage, kv, return_ids)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Usage of a full response (a stream's usage chunk has only the three counts)."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
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
    system_fingerprint: str | None = None,
    token_ids: tuple[list[int], list[int]] | None = None,
) -> bytes:
    """A non-streaming response body, keys in vLLM 0.32's order; ``token_ids`` = (prompt,
    generated) when the client asked ``return_token_ids``."""
    prompt_ids, out_ids = token_ids or (None, None)
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
            "token_ids": out_ids,
            "routed_experts": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": final.finish_reason,
            "stop_reason": final.stop_reason,
            "token_ids": out_ids,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids,
            "routed_experts": None,
        }
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": system_fingerprint,
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if kind == "chat":
        body["prompt_logprobs"] = None
        body["prompt_token_ids"] = prompt_ids
        body["prompt_text"] = None
    body["kv_transfer_params"] = kv_transfer_params
    body["ec_transfer_params"] = None
    body["metrics"] = None
    return orjson.dumps(body)


class ChunkWriter:
    """Builds the SSE events of one stream; the per-token path is plain byte concatenation.

    Shapes as vLLM 0.32 sends them: a chat stream opens with a role chunk (empty content, no
    ``token_ids``); a text chunk may carry several tokens; the finishing chunk carries the last
    text and ``finish_reason``; the usage chunk has ``"choices": []``.
    """

    def __init__(
        self, kind: Kind, rid: str, created: int, model: str, system_fingerprint: str | None = None
    ) -> None:
        self.kind = kind
        self._fingerprint = system_fingerprint
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
            b'"logprobs":null,"finish_reason":null}],'
            b'"prompt_token_ids":null,"prompt_text":null}\n\n'
        )

    def delta(self, text: str) -> bytes:
        return b"data: " + self._pre + orjson.dumps(text) + self._post + b"\n\n"

    def final(self, step: Step) -> bytes:
        """The finishing chunk; ``step.text`` is all text not sent yet."""
        tail: dict[str, Any] = {
            "logprobs": None,
            "finish_reason": step.finish_reason,
            "stop_reason": step.stop_reason,
        }
        if self.kind == "completion":
            tail["prompt_token_ids"] = None
        tail["token_ids"] = None
        rest = orjson.dumps(tail)[1:]
        if self.kind == "chat":
            delta = orjson.dumps({"content": step.text})
            body = self._head + b',"choices":[{"index":0,"delta":' + delta + b"," + rest
        else:
            body = self._head + b',"choices":[{"index":0,"text":' + orjson.dumps(step.text)
            body += b"," + rest
        return b"data: " + body + b"]}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        u = usage(prompt_tokens, completion_tokens)
        del u["prompt_tokens_details"], u["completion_tokens_details"]
        tail = orjson.dumps({"usage": u, "system_fingerprint": self._fingerprint})[1:]
        return b"data: " + self._head + b',"choices":[],' + tail + b"\n\n"

    @staticmethod
    def error(message: str, err_type: str, code: int) -> bytes:
        return b"data: " + error_body(message, err_type, code) + b"\n\n"


DONE = b"data: [DONE]\n\n"
