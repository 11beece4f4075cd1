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

from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from pdsim.model import SamplingSpec, Step
from pdsim.tokenizer import SimTokenizer

Kind = Literal["completion", "chat"]
GREEDY_TEMPERATURE = 1e-5  # vLLM samples greedily below this (_SAMPLING_EPS)


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
class Prompt:
    """One prompt of a request: its ids, its text as echoed, its sampling (``max_tokens``
    clamped to the context it leaves)."""

    ids: list[int]
    text: str
    spec: SamplingSpec


@dataclass(frozen=True)
class GenRequest:
    """A validated generation request: ``n`` completions of each prompt (choice i * n + j)."""

    kind: Kind
    prompts: list[Prompt]
    stream: bool
    include_usage: bool
    kv_params: dict[str, Any] | None
    return_token_ids: bool = False  # full responses only; streams keep token_ids null
    n: int = 1
    seed: int | None = None  # sampling seed; None: greedy (see model.Generation)
    beam: bool = False  # use_beam_search: n beams
    echo: str | None = None  # text put before each choice's output (chat: the last message)
    echo_only: bool = False  # completions echo with max_tokens 0: the prompt alone
    logprobs: int | None = None  # logprobs per output token (chat: top_logprobs)
    prompt_logprobs: int | None = None
    priority: int = 0
    continuous_usage: bool = False

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0].ids

    def spec(self, i: int, j: int) -> SamplingSpec:
        """Sampling of completion j of prompt i: vLLM gives sample j the seed ``seed + j``."""
        spec = self.prompts[i].spec
        if self.beam:
            return replace(spec, first_rank=j)
        if self.seed is not None:
            return replace(spec, seed=self.seed + j)
        return spec


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        msg = "Input should be a valid integer, unable to parse string as an integer"
        raise schema_error([field_error("int_parsing", name, msg, value)])
    if isinstance(value, float) and not value.is_integer():
        msg = "Input should be a valid integer, got a number with a fractional part"
        raise schema_error([field_error("int_from_float", name, msg, value)])
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise schema_error(
            [field_error("int_type", name, "Input should be a valid integer", value)]
        )
    return int(value)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


def _raw_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """A completions body's prompts, each a string or token ids, as vLLM's schema reads them."""
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        raise vllm_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt == []:
        raise vllm_error("You must pass at least one prompt", None)
    if _token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt):
            if any(p in ("", []) for p in prompt):
                raise vllm_error("The decoder prompt cannot be empty", None)
            return list(prompt)
        if isinstance(prompt[0], str):
            msg = "Input should be a valid integer, unable to parse string as an integer"
            raise schema_error([field_error("int_parsing", "prompt.0", msg, prompt[0])])
        if isinstance(prompt[0], list):
            msg = "Input should be a valid integer"
            raise schema_error([field_error("int_type", "prompt.0", msg, prompt[0])])
    msg = "Input should be a valid string"
    raise schema_error([field_error("string_type", "prompt", msg, prompt)])


def _prompts(
    kind: Kind, body: dict[str, Any], tok: SimTokenizer
) -> list[tuple[list[int], bool, str]]:
    """Each prompt's token ids, whether they came from text (vLLM then counts an overlong
    prompt only up to ``max_model_len + 1``), and its text."""
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
        return [(tok.encode(text), True, text)]
    special = bool(body.get("add_special_tokens", True))
    return [
        (tok.encode(p, special), True, p) if isinstance(p, str) else (list(p), False, tok.decode(p))
        for p in _raw_prompts(body)
    ]


def _chat_echo(body: dict[str, Any]) -> str:
    """What vLLM's chat `echo` puts before the output: the last message's content when its role
    is the response's (the assistant's, or with add_generation_prompt false any)."""
    last = body["messages"][-1]
    role = "assistant" if body.get("add_generation_prompt", True) else last.get("role")
    content = last.get("content") if last.get("role") == role else None
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _sampling(body: dict[str, Any], n: int, beam: bool) -> int | None:
    """The seed to sample with, or None for greedy; rejects what vLLM's SamplingParams does."""
    if n < 1:
        raise vllm_error(f"n must be at least 1, got {n}.", None)
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float))
    ):
        msg = "Input should be a valid number"
        raise schema_error([field_error("float_type", "temperature", msg, temperature)])
    greedy = temperature is not None and temperature < GREEDY_TEMPERATURE
    if greedy and n > 1 and not beam:
        raise vllm_error(f"n must be 1 when using greedy sampling, got {n}.", None)
    seed = _int_field(body, "seed")
    return None if greedy or beam or seed is None or seed == -1 else seed


def _logprob_counts(kind: Kind, body: dict[str, Any]) -> tuple[int | None, int | None]:
    """Logprobs per output token and per prompt token, as vLLM reads and checks them (a stream
    may not ask `prompt_logprobs`, but may echo with `logprobs`, which implies them)."""
    prompt_k = _int_field(body, "prompt_logprobs")
    if body.get("stream") and prompt_k is not None and (prompt_k > 0 or prompt_k == -1):
        raise vllm_error(
            "`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs"
        )
    if kind == "chat":
        top = _int_field(body, "top_logprobs") or 0
        out_k = top if body.get("logprobs") else None
    else:
        out_k = _int_field(body, "logprobs")
        if prompt_k is None and body.get("echo"):
            prompt_k = out_k
    for name, k in (("prompt_logprobs", prompt_k), ("logprobs", out_k)):
        if k is not None and k < 0 and k != -1:
            raise vllm_error(f"`{name}` must be a positive value or -1.", name, k)
    return out_k, prompt_k


def _context_error(max_model_len: int, count: int) -> ApiError:
    qualifier = "at least " if count == max_model_len + 1 else ""
    return vllm_error(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"prompt contains {qualifier}{count} input tokens, which exceeds this limit even "
        f"without any output tokens. Please reduce the length of the input prompt.",
        "input_tokens",
        count,
    )


def parse_generation(
    kind: Kind, body: Any, model: str, max_model_len: int, tok: SimTokenizer
) -> GenRequest:
    """Validate a completion or chat body; raises ``ApiError``."""
    if not isinstance(body, dict):
        raise not_an_object(body)
    requested = body.get("model")
    if requested is not None and requested != model:
        raise model_not_found(requested, model)
    n_field = _int_field(body, "n")
    n = 1 if n_field is None else n_field
    priority = _int_field(body, "priority") or 0
    stream = bool(body.get("stream", False))
    stream_options = body.get("stream_options")
    if stream_options and not stream:
        raise vllm_error("Stream options can only be defined when `stream=True`.", "stream_options")
    options = stream_options if isinstance(stream_options, dict) else {}
    include_usage = bool(options.get("include_usage"))
    out_k, prompt_k = _logprob_counts(kind, body)

    prompts = _prompts(kind, body, tok)
    for ids, from_text, _ in prompts:
        if len(ids) > max_model_len:
            raise _context_error(max_model_len, max_model_len + 1 if from_text else len(ids))
    echo = bool(body.get("echo"))
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
    echo_only = kind == "completion" and echo and max_tokens == 0
    if echo_only:
        max_tokens = 1  # vLLM generates one token and answers with the prompt alone
    if max_tokens is not None and max_tokens < 1:
        # vLLM names max_tokens even when the chat client sent max_completion_tokens
        raise vllm_error(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    beam = bool(body.get("use_beam_search"))
    seed = _sampling(body, n, beam)
    min_key = "min_completion_tokens" if "min_completion_tokens" in body else "min_tokens"
    min_tokens = _int_field(body, min_key) or 0

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
    parsed = []
    for ids, _, text in prompts:
        room = max_model_len - len(ids)
        limit = room if max_tokens is None else min(max_tokens, room)
        if limit < 1:
            raise ApiError(
                f"This model's maximum context length is {max_model_len} tokens and the prompt "
                f"uses all of them, leaving no room for output.",
                param="max_tokens",
            )
        if min_tokens < 0 or min_tokens > limit:
            raise ApiError(f"{min_key} must be between 0 and max_tokens.", param=min_key)
        spec = SamplingSpec(
            max_tokens=limit,
            min_tokens=min_tokens,
            ignore_eos=bool(body.get("ignore_eos", False)),
            stop=stops,
            stop_token_ids=frozenset(stop_ids),
            include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
        )
        parsed.append(Prompt(ids, text, spec))
    return_ids = bool(body.get("return_token_ids"))
    if not echo:
        echo_text = None
    elif kind == "chat":
        echo_text = _chat_echo(body)
    else:
        echo_text = ""  # per prompt: Prompt.text (empty with return_token_ids, as vLLM)
    return GenRequest(
        kind,
        parsed,
        stream,
        include_usage,
        kv,
        return_ids,
        n=n,
        seed=seed,
        beam=beam,
        echo=echo_text,
        echo_only=echo_only,
        logprobs=out_k,
        prompt_logprobs=prompt_k,
        priority=priority,
        continuous_usage=include_usage and bool(options.get("continuous_usage_stats")),
    )


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

    def role(self, index: int = 0, usage: dict[str, int] | None = None) -> bytes:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}  # fmt: skip
        tail: dict[str, Any] = {"prompt_token_ids": None, "prompt_text": None}
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
    ) -> bytes:
        """Any text chunk: choice `index`, finishing when `final` is given."""
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
        choice["token_ids"] = None
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
