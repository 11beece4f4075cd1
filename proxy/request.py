"""Reading and checking a client's OpenAI request: just enough to route it safely.

Full validation is the engine's job (its 4xx is passed through); here we reject only what would
make the legs misbehave, or what vLLM would reject but fanning out would hide (`n > 1` with greedy
sampling), with a message that says what to change. A request for several completions (a list of
prompts, `n > 1`) is noted here and split by `proxy.flow.fanout`.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_REQUEST_ID = 256
MAX_TOKENS = 2**31 - 1  # beyond any context length; the engine checks its own limit
GREEDY_TEMPERATURE = 1e-5  # vLLM samples greedily below this temperature (_SAMPLING_EPS)


@dataclass(slots=True)
class ClientRequest:
    path: str
    body: dict[str, Any]
    request_id: str
    stream: bool
    include_usage: bool
    prompt_chars: int
    priority: int = 0  # vLLM's `priority`: lower is served first (also in the proxy's queue)
    prompts: list[Any] | None = None  # completions with two or more prompts: each str or ids
    n: int = 1  # completions asked for per prompt
    max_tokens: int | None = None  # the client's cap on the answer (max_completion_tokens first)
    # why this request must be served by a decoder alone, without a prefill leg: "prompt_logprobs"
    # (a decoder given the prompt's KV never computed the prompt's logits), "beam_search" (its
    # beams are engine requests of their own, which must not pull one prefill's blocks)
    local_reason: str | None = None

    @property
    def samples(self) -> int:
        """Sub-requests per prompt when fanned out (beam search keeps its `n` as the beam width)."""
        return 1 if self.local_reason == "beam_search" else self.n

    @property
    def fanout(self) -> int:
        """How many sub-requests serve this request (1: it is served as it is)."""
        return len(self.prompts or (None,)) * self.samples


REQUEST_ID_PREFIX = "pdp-"  # what a fresh request id starts with


def new_request_id(prefix: str = REQUEST_ID_PREFIX) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def check_request_id(value: bytes | None, prefix: str = REQUEST_ID_PREFIX) -> str:
    """The client's X-Request-Id if usable, else a fresh one (unique across restarts) that
    starts with `prefix`."""
    if value is None or value == b"":
        return new_request_id(prefix)
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


def _is_token_ids(value: Any) -> bool:
    # the types' set: a third of the time of a generator over 2,000 ids (bool is not int here)
    return isinstance(value, list) and bool(value) and set(map(type, value)) == {int}


def one_prompt_chars(prompt: Any) -> int:
    """The size the policies weigh a prompt by: characters, or 4 per token id."""
    return len(prompt) if isinstance(prompt, str) else 4 * len(prompt)


def _completion_prompts(body: dict[str, Any]) -> list[Any]:
    """The prompts of a completions request, each a string or a list of token ids; a one-element
    list is unwrapped in `body`, as vLLM serves it as that one prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and (
        all(isinstance(p, str) for p in prompt) or all(_is_token_ids(p) for p in prompt)
    ):
        if len(prompt) == 1:
            body["prompt"] = prompt[0]
        if prompt:
            return list(prompt)
    raise BadRequest(
        "'prompt' must be a string, a list of token ids, or a non-empty list of strings or of "
        "token-id lists (not mixed)",
        param="prompt",
    )


def _chat_chars(body: dict[str, Any]) -> int:
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


def _whole_number(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
    ):
        raise BadRequest(
            f"'{key}' must be a whole number from {low} to {high}, not {value!r}", param=key
        )
    return value


def _priority(body: dict[str, Any], header: bytes | None) -> int:
    """vLLM's request priority: the `X-Vllm-Priority` header when it is a whole number (vLLM
    lets it override the body; it is written into the body so both legs carry it), else the
    body's `priority`, else 0."""
    if header is not None:
        with contextlib.suppress(ValueError):  # vLLM ignores a header it cannot read
            body["priority"] = int(header)
    priority = _whole_number(body, "priority", -(2**63), 2**63 - 1)
    return 0 if priority is None else priority


def _local_reason(path: str, body: dict[str, Any]) -> str | None:
    if body.get("prompt_logprobs") is not None or (
        path == COMPLETIONS and body.get("echo") and body.get("logprobs") is not None
    ):
        return "prompt_logprobs"
    if body.get("use_beam_search"):
        return "beam_search"
    return None


def parse_request(
    path: str, raw: bytes, request_id: str, priority_header: bytes | None = None
) -> ClientRequest:
    """Parse and check a completions or chat request body; raise BadRequest saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    # no model (or an empty one): each engine serves its first served model name, as vLLM does
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    echo_only = path == COMPLETIONS and bool(body.get("echo"))  # max_tokens 0: the prompt alone
    max_tokens = _whole_number(body, "max_tokens", 0 if echo_only else 1, MAX_TOKENS)
    max_completion_tokens = _whole_number(body, "max_completion_tokens", 1, MAX_TOKENS)
    n = _whole_number(body, "n", 1, MAX_TOKENS) or 1
    local_reason = _local_reason(path, body)
    temperature = body.get("temperature")
    if (
        n > 1
        and local_reason != "beam_search"
        and isinstance(temperature, (int, float))
        and temperature < GREEDY_TEMPERATURE
    ):
        # vLLM refuses this; its n sub-requests of one would each be accepted
        raise BadRequest(f"n must be 1 when using greedy sampling, got {n}.", param="n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage"))
    prompts = None if path == CHAT else _completion_prompts(body)
    return ClientRequest(
        path=path,
        body=body,
        request_id=request_id,
        stream=stream,
        include_usage=include_usage,
        prompt_chars=_chat_chars(body) if prompts is None else sum(map(one_prompt_chars, prompts)),
        priority=_priority(body, priority_header),
        prompts=prompts if prompts is not None and len(prompts) > 1 else None,
        n=n,
        max_tokens=max_tokens if max_completion_tokens is None else max_completion_tokens,
        local_reason=local_reason,
    )
