"""Reading and checking a client's OpenAI request: just enough to route it safely.

Full validation is the engine's job (its 4xx is passed through); here we reject only what
disaggregated serving cannot do, or what would make the legs misbehave, with a message that says
what to change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_REQUEST_ID = 256
MAX_TOKENS = 2**31 - 1  # beyond any context length; the engine checks its own limit


@dataclass(slots=True)
class ClientRequest:
    path: str
    body: dict[str, Any]
    request_id: str
    stream: bool
    include_usage: bool
    prompt_chars: int


def new_request_id() -> str:
    return f"pdp-{uuid.uuid4().hex}"


def check_request_id(value: bytes | None) -> str:
    """The client's X-Request-Id if usable, else a fresh one (unique across restarts)."""
    if value is None or value == b"":
        return new_request_id()
    text = value.decode("latin-1")
    if len(text) > MAX_REQUEST_ID or not text.isprintable() or not text.isascii():
        raise BadRequest(
            f"X-Request-Id must be 1 to {MAX_REQUEST_ID} printable ASCII characters",
            param="X-Request-Id",
        )
    return text


def _text_size(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def _prompt_chars(path: str, body: dict[str, Any]) -> int:
    if path == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of messages", param="messages")
        size = 0
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(
                    "each message must be an object with a string 'role'", param="messages"
                )
            size += _text_size(message.get("content"))
        return size
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return 4 * len(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            body["prompt"] = prompt[0]
            return _prompt_chars(path, body)
        raise BadRequest(
            f"a list of {len(prompt)} prompts is not supported: disaggregated prefill hands over "
            "the KV cache of exactly one prompt per request; send one request per prompt",
            param="prompt",
        )
    raise BadRequest(
        "'prompt' must be a string, a list of token ids, or a one-element list of either",
        param="prompt",
    )


def parse_request(path: str, raw: bytes, request_id: str) -> ClientRequest:
    """Parse and check a completions or chat request body; raise BadRequest saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest(
            "'n' other than 1 is not supported: the decoder can pull the prefilled KV cache for "
            "one sequence only; send n separate requests",
            param="n",
        )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS
        ):
            raise BadRequest(
                f"'{key}' must be a whole number from 1 to {MAX_TOKENS}, not {value!r}", param=key
            )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))
    return ClientRequest(
        path=path,
        body=body,
        request_id=request_id,
        stream=stream,
        include_usage=include_usage,
        prompt_chars=_prompt_chars(path, body),
    )
